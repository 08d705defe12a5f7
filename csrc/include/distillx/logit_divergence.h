// Host side of distillx::logit_divergence, device-agnostic: divergence codes, argument checks,
// contiguity, row weights and outputs. Each device supplies its row kernel (declared below, defined in
// csrc/cpu/logit_divergence.cpp and csrc/cuda/logit_divergence.cu); distillx::linear_divergence
// (linear_divergence.h) reuses the same row kernels on its chunks of logits.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "distillx/checks.h"

namespace distillx {

// Divergence codes shared with distillx/ops/_library.py (DIVERGENCE_CODES).
enum Divergence : int64_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

inline void check_divergence(int64_t divergence, double temperature, double beta) {
  TORCH_CHECK(divergence >= 0 && divergence <= 2, "distillx: divergence code must be 0 (kl), 1 (reverse_kl) or 2 (jsd), got ",
              divergence);
  TORCH_CHECK(temperature > 0, "distillx: temperature must be > 0, got ", temperature);
  TORCH_CHECK(beta >= 0 && beta <= 1, "distillx: beta must be in [0, 1], got ", beta);
}

// The device row kernels: loss (n,) and, when grad is defined, the weighted gradient (n, C), which may
// alias student. Inputs contiguous, weight in the accumulation dtype (float64 for float64 inputs).
namespace cpu {
void divergence_rows(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight,
                     const at::Tensor& loss, const at::Tensor& grad, double temperature, int64_t divergence,
                     double beta);
}  // namespace cpu
namespace cuda {
void divergence_rows(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight,
                     const at::Tensor& loss, const at::Tensor& grad, double temperature, int64_t divergence,
                     double beta);
}  // namespace cuda

// RowsFn(student, teacher, weight, loss_out, grad_out_or_undefined); AllocFn(sizes, options) makes
// the (N, C) gradient (the CPU asks for huge pages).
template <typename RowsFn, typename AllocFn>
std::tuple<at::Tensor, at::Tensor> logit_divergence_host(const at::Tensor& student, const at::Tensor& teacher,
                                                         const std::optional<at::Tensor>& row_weight,
                                                         double temperature, int64_t divergence, double beta,
                                                         bool compute_grad, RowsFn&& rows, AllocFn&& alloc) {
  check_matrix(student, "student");
  check_matrix(teacher, "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "distillx: student and teacher logits must have the same shape, got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "distillx: student and teacher dtypes differ (",
              student.scalar_type(), " vs ", teacher.scalar_type(), ")");
  check_same_device(student, teacher, "student", "teacher");
  check_row_weight(row_weight, student, student.size(0));
  check_divergence(divergence, temperature, beta);
  const at::Tensor s = student.contiguous(), t = teacher.contiguous();
  const int64_t N = s.size(0);
  const auto acc = s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = row_weight ? row_weight->to(acc).contiguous() : at::ones({N}, s.options().dtype(acc));
  at::Tensor loss = at::empty({N}, w.options());
  at::Tensor grad = compute_grad ? alloc(s.sizes(), s.options()) : at::Tensor();
  if (N > 0 && s.size(1) > 0) {
    rows(s, t, w, loss, grad);
  } else {
    loss.zero_();
    if (compute_grad) grad.zero_();
  }
  return {loss, compute_grad ? grad : at::empty({0}, s.options())};
}

}  // namespace distillx
