// CPU kernel of distillx::linear_divergence: the device-agnostic chunk loop of
// include/distillx/linear_divergence.h with the CPU row kernel of distillx::logit_divergence.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "distillx/linear_divergence.h"
#include "distillx/logit_divergence.h"

namespace distillx {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_divergence_cpu(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
    const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& row_weight, double temperature, int64_t divergence, double beta,
    int64_t chunk_size, bool compute_grad) {
  return linear_divergence_host(
      student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, row_weight,
      temperature, divergence, beta, chunk_size, compute_grad, ChunkPolicy{int64_t{64} << 20, true, true},
      [&](const at::Tensor& ls, const at::Tensor& lt, const at::Tensor& w, const at::Tensor& loss, const at::Tensor& g) {
        cpu::divergence_rows(ls, lt, w, loss, g, temperature, divergence, beta);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(distillx, CPU, m) {
  m.impl("linear_divergence", &linear_divergence_cpu);
}

}  // namespace distillx
