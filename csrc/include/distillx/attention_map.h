// Host side of distillx::attention_map and its backward, shared by the CPU and CUDA kernels:
// argument checks (the Python wrapper validates user input with argument names first).
#pragma once

#include <ATen/ATen.h>

#include "distillx/checks.h"

namespace distillx {

inline void check_attention_map(const at::Tensor& f, double p) {
  TORCH_CHECK(f.dim() == 4, "distillx: attention_map expects a (B, C, H, W) feature map, got shape ", f.sizes());
  TORCH_CHECK(f.scalar_type() == at::kFloat || f.scalar_type() == at::kDouble,
              "distillx: attention_map expects float32 or float64, got ", f.scalar_type());
  TORCH_CHECK(p > 0, "distillx: p must be > 0, got ", p);
}

inline void check_attention_map_backward(const at::Tensor& grad_map, const at::Tensor& f, double p) {
  check_attention_map(f, p);
  check_same_device(grad_map, f, "grad_map", "feature");
  const int64_t elements = f.size(0) * f.size(2) * f.size(3);
  TORCH_CHECK(grad_map.numel() == elements, "distillx: grad_map must have ", elements, " elements, got ",
              grad_map.numel());
}

}  // namespace distillx
