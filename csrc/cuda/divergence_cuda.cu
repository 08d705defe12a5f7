// CUDA kernels of the logit-divergence family (schemas in csrc/distillx.cpp): host wrappers that
// check inputs, launch the row kernel of include/distillx/cuda/divergence_row.cuh on the current
// stream, and reuse the device-agnostic chunk loop of include/distillx/linear_chunks.h.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "distillx/checks.h"
#include "distillx/cuda/divergence_row.cuh"
#include "distillx/divergence_host.h"

namespace distillx {
namespace {

template <typename T>
struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

void divergence_rows_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight,
                          const at::Tensor& loss, const at::Tensor& grad, double temperature, int64_t divergence,
                          double beta) {
  const int64_t N = student.size(0), C = student.size(1);
  const c10::cuda::CUDAGuard guard(student.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "distillx_divergence_cuda", [&] {
    using T = typename CudaType<scalar_t>::type;
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cuda::launch_logit_divergence<T, A>(
        reinterpret_cast<const T*>(student.const_data_ptr<scalar_t>()),
        reinterpret_cast<const T*>(teacher.const_data_ptr<scalar_t>()), weight.const_data_ptr<A>(),
        loss.mutable_data_ptr<A>(), grad.defined() ? reinterpret_cast<T*>(grad.mutable_data_ptr<scalar_t>()) : nullptr,
        N, C, static_cast<A>(temperature), static_cast<A>(beta), static_cast<int>(divergence), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> logit_divergence_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                         const std::optional<at::Tensor>& row_weight,
                                                         double temperature, int64_t divergence, double beta,
                                                         bool compute_grad) {
  return logit_divergence_host(
      student, teacher, row_weight, temperature, divergence, beta, compute_grad,
      [&](const at::Tensor& s, const at::Tensor& t, const at::Tensor& w, const at::Tensor& loss, const at::Tensor& grad) {
        divergence_rows_cuda(s, t, w, loss, grad, temperature, divergence, beta);
      },
      [](at::IntArrayRef sizes, const at::TensorOptions& o) { return at::empty(sizes, o); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_divergence_cuda(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
    const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& row_weight, double temperature, int64_t divergence, double beta,
    int64_t chunk_size, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(student_hidden.device());
  return linear_divergence_host(
      student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, row_weight,
      temperature, divergence, beta, chunk_size, compute_grad, ChunkPolicy{int64_t{256} << 20, false},
      [&](const at::Tensor& ls, const at::Tensor& lt, const at::Tensor& w, const at::Tensor& loss, const at::Tensor& g) {
        divergence_rows_cuda(ls, lt, w, loss, g, temperature, divergence, beta);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(distillx, CUDA, m) {
  m.impl("logit_divergence", &logit_divergence_cuda);
  m.impl("linear_divergence", &linear_divergence_cuda);
}

}  // namespace distillx
