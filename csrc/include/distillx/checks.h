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

}  // namespace distillx
