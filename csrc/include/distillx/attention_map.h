// Host side of distillx::attention_map and its backward, shared by the CPU and CUDA kernels:
// argument checks (the Python wrapper validates user input with argument names first).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "distillx/checks.h"

namespace distillx {

// half: the device's kernel reads bfloat16/float16 features itself (math and the returned map and
// scales in float32; the CPU's does).
inline void check_attention_map(const at::Tensor& f, double p, bool half = false) {
  TORCH_CHECK(f.dim() == 4, "distillx: attention_map expects a (B, C, H, W) feature map, got shape ", f.sizes());
  const auto t = f.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || (half && (t == at::kBFloat16 || t == at::kHalf)),
              "distillx: attention_map expects float32 or float64", half ? ", bfloat16 or float16" : "", ", got ",
              t);
  TORCH_CHECK(p > 0, "distillx: p must be > 0, got ", p);
}

// The per-sample scales m (B,) the forward returned, in the features' math dtype and contiguous.
inline at::Tensor attention_map_scale(const at::Tensor& grad_map, const at::Tensor& f, const at::Tensor& scale,
                                      double p, bool half = false) {
  check_attention_map(f, p, half);
  check_same_device(grad_map, f, "grad_map", "feature");
  check_same_device(scale, f, "scale", "feature");
  const int64_t elements = f.size(0) * f.size(2) * f.size(3);
  TORCH_CHECK(grad_map.numel() == elements, "distillx: grad_map must have ", elements, " elements, got ",
              grad_map.numel());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == f.size(0), "distillx: scale must have shape (", f.size(0),
              ",), got ", scale.sizes());
  return scale.to(at::toOpMathType(f.scalar_type())).contiguous();
}

}  // namespace distillx
