// Argument checks of distillx::attention_relation and its backward, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "distillx/checks.h"

namespace distillx {

inline void check_relation_inputs(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t,
                                  const at::Tensor& k_t, const std::optional<at::Tensor>& key_padding_mask) {
  for (const auto* x : {&q_s, &k_s, &q_t, &k_t}) {
    TORCH_CHECK(x->dim() == 4, "distillx: attention_relation expects (B, A, L, d) inputs, got ", x->sizes());
    TORCH_CHECK(x->scalar_type() == q_s.scalar_type() &&
                    (q_s.scalar_type() == at::kFloat || q_s.scalar_type() == at::kDouble),
                "distillx: attention_relation expects float32 or float64 inputs of one dtype");
    check_same_device(*x, q_s, "every input", "q_s");
  }
  TORCH_CHECK(k_s.sizes() == q_s.sizes(), "distillx: k_s must match q_s, got ", k_s.sizes(), " and ", q_s.sizes());
  TORCH_CHECK(k_t.sizes() == q_t.sizes(), "distillx: k_t must match q_t, got ", k_t.sizes(), " and ", q_t.sizes());
  TORCH_CHECK(q_t.size(0) == q_s.size(0) && q_t.size(1) == q_s.size(1) && q_t.size(2) == q_s.size(2),
              "distillx: q_t (B, A, L) must match q_s's, got ", q_t.sizes(), " and ", q_s.sizes());
  if (key_padding_mask) {
    TORCH_CHECK(key_padding_mask->scalar_type() == at::kBool && key_padding_mask->dim() == 2 &&
                    key_padding_mask->size(0) == q_s.size(0) && key_padding_mask->size(1) == q_s.size(2),
                "distillx: key_padding_mask must be a bool (B, L) tensor");
    check_same_device(*key_padding_mask, q_s, "key_padding_mask", "q_s");
  }
}

inline void check_relation_stats(const at::Tensor& stats, const at::Tensor& q_s, const at::Tensor& grad) {
  TORCH_CHECK(stats.dim() == 4 && stats.size(0) == q_s.size(0) && stats.size(1) == q_s.size(1) &&
                  stats.size(2) == q_s.size(2) && stats.size(3) == 2 && stats.scalar_type() == q_s.scalar_type(),
              "distillx: attention_relation_backward expects the forward's (B, A, L, 2) stats, got ", stats.sizes());
  check_same_device(stats, q_s, "stats", "q_s");
  TORCH_CHECK(grad.numel() == 1, "distillx: attention_relation_backward expects a scalar grad, got ", grad.sizes());
}

}  // namespace distillx
