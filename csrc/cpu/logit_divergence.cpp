// CPU kernel of distillx::logit_divergence (schema in csrc/distillx.cpp, row math in
// include/distillx/cpu/logit_divergence.h). Its row loop also serves distillx::linear_divergence.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "distillx/cpu/logit_divergence.h"
#include "distillx/cpu/memory.h"
#include "distillx/logit_divergence.h"

namespace distillx {

void cpu::divergence_rows(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight,
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

namespace {

std::tuple<at::Tensor, at::Tensor> logit_divergence_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                        const std::optional<at::Tensor>& row_weight,
                                                        double temperature, int64_t divergence, double beta,
                                                        bool compute_grad) {
  return logit_divergence_host(
      student, teacher, row_weight, temperature, divergence, beta, compute_grad,
      [&](const at::Tensor& s, const at::Tensor& t, const at::Tensor& w, const at::Tensor& loss, const at::Tensor& grad) {
        cpu::divergence_rows(s, t, w, loss, grad, temperature, divergence, beta);
      },
      cpu::empty_prefaulted);
}

}  // namespace

TORCH_LIBRARY_IMPL(distillx, CPU, m) {
  m.impl("logit_divergence", &logit_divergence_cpu);
}

}  // namespace distillx
