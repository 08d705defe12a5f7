// CPU kernels of the logit-divergence family: distillx::logit_divergence and
// distillx::linear_divergence (schemas in csrc/distillx.cpp, math in divergence_row_cpu.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "distillx/checks.h"
#include "distillx/cpu_memory.h"
#include "distillx/divergence_row_cpu.h"
#include "distillx/linear_chunks.h"

namespace distillx {
namespace {

// Fills loss (n,) and, if compute_grad, grad (n,C) (which may be `student` itself). Inputs contiguous.
void divergence_rows_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight,
                         const at::Tensor& loss, const at::Tensor& grad, double temperature, int64_t divergence,
                         double beta) {
  const int64_t N = student.size(0), C = student.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "distillx_divergence_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const cpu::DivergenceParams<acc_t> prm{divergence, acc_t(1.0 / temperature), acc_t(temperature), acc_t(beta)};
    const scalar_t* s = student.const_data_ptr<scalar_t>();
    const scalar_t* t = teacher.const_data_ptr<scalar_t>();
    const acc_t* w = weight.const_data_ptr<acc_t>();
    acc_t* out = loss.mutable_data_ptr<acc_t>();
    scalar_t* g = grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    // Rows are independent; a task gets enough rows to amortise its scratch allocation.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(4 * cpu::padded_cols<acc_t>(C));
      for (int64_t i = begin; i < end; ++i) {
        out[i] = cpu::divergence_row<scalar_t, acc_t>(s + i * C, t + i * C, g ? g + i * C : nullptr, C, w[i], prm,
                                                      scratch.data());
      }
    });
  });
}

at::Tensor row_weight_or_ones(const std::optional<at::Tensor>& row_weight, const at::Tensor& ref, int64_t N) {
  const auto acc = ref.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return row_weight ? row_weight->to(acc).contiguous() : at::ones({N}, ref.options().dtype(acc));
}

std::tuple<at::Tensor, at::Tensor> logit_divergence_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                        const std::optional<at::Tensor>& row_weight,
                                                        double temperature, int64_t divergence, double beta,
                                                        bool compute_grad) {
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
  const at::Tensor w = row_weight_or_ones(row_weight, s, N);
  at::Tensor loss = at::empty({N}, w.options());
  at::Tensor grad = compute_grad ? cpu::empty_for_write(s.sizes(), s.options()) : at::Tensor();
  if (N > 0 && s.size(1) > 0) {
    divergence_rows_cpu(s, t, w, loss, grad, temperature, divergence, beta);
  } else {
    loss.zero_();
    if (compute_grad) grad.zero_();
  }
  return {loss, compute_grad ? grad : at::empty({0}, s.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_divergence_cpu(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
    const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& row_weight, double temperature, int64_t divergence, double beta,
    int64_t chunk_size, bool compute_grad) {
  check_divergence(divergence, temperature, beta);
  return chunked_linear_divergence(
      student_hidden.contiguous(), student_weight.contiguous(), student_bias, teacher_hidden.contiguous(),
      teacher_weight.contiguous(), teacher_bias, row_weight, chunk_size, compute_grad, ChunkPolicy{int64_t{64} << 20, true},
      [&](const at::Tensor& ls, const at::Tensor& lt, const at::Tensor& w, const at::Tensor& loss, bool grad) {
        divergence_rows_cpu(ls, lt, w, loss, grad ? ls : at::Tensor(), temperature, divergence, beta);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(distillx, CPU, m) {
  m.impl("logit_divergence", &logit_divergence_cpu);
  m.impl("linear_divergence", &linear_divergence_cpu);
}

}  // namespace distillx
