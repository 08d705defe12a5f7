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

// The per-sample scales m (B,) the forward returned, in the feature's dtype and contiguous.
inline at::Tensor attention_map_scale(const at::Tensor& grad_map, const at::Tensor& f, const at::Tensor& scale,
                                      double p) {
  check_attention_map(f, p);
  check_same_device(grad_map, f, "grad_map", "feature");
  check_same_device(scale, f, "scale", "feature");
  const int64_t elements = f.size(0) * f.size(2) * f.size(3);
  TORCH_CHECK(grad_map.numel() == elements, "distillx: grad_map must have ", elements, " elements, got ",
              grad_map.numel());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == f.size(0), "distillx: scale must have shape (", f.size(0),
              ",), got ", scale.sizes());
  return scale.to(f.scalar_type()).contiguous();
}

}  // namespace distillx
