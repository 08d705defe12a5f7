// Shared argument checks for the distillx operators. The Python wrappers validate user input with
// argument names first; these checks guard direct calls of torch.ops.distillx.* and keep kernels safe.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace distillx {

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "distillx: ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_matrix(const at::Tensor& t, const char* name) {
  check_float(t, name);
  TORCH_CHECK(t.dim() == 2, "distillx: ", name, " must be 2-D, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
  TORCH_CHECK(a.device() == b.device(), "distillx: ", na, " is on ", a.device(), " but ", nb, " is on ",
              b.device(), "; move both to one device");
}

// Optional per-row weight (N,): float32/float64, same device, one entry per row.
inline void check_row_weight(const std::optional<at::Tensor>& w, const at::Tensor& ref, int64_t rows) {
  if (!w.has_value()) return;
  check_float(*w, "row_weight");
  TORCH_CHECK(w->dim() == 1 && w->size(0) == rows, "distillx: row_weight must have shape (", rows,
              ",), got ", w->sizes());
  check_same_device(*w, ref, "row_weight", "student");
}

// Divergence codes shared with distillx/ops/logit_divergence.py.
enum Divergence : int64_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

inline void check_divergence(int64_t divergence, double temperature, double beta) {
  TORCH_CHECK(divergence >= 0 && divergence <= 2, "distillx: divergence code must be 0 (kl), 1 (reverse_kl) or 2 (jsd), got ",
              divergence);
  TORCH_CHECK(temperature > 0, "distillx: temperature must be > 0, got ", temperature);
  TORCH_CHECK(beta >= 0 && beta <= 1, "distillx: beta must be in [0, 1], got ", beta);
}

}  // namespace distillx
