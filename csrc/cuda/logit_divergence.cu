// CUDA kernel of distillx::logit_divergence (schema in csrc/distillx.cpp): the host wrapper checks
// inputs and launches the row kernel of include/distillx/cuda/logit_divergence.cuh on the current
// stream. Its row launcher also serves distillx::linear_divergence (cuda/linear_divergence.cu).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "distillx/cuda/logit_divergence.cuh"
#include "distillx/logit_divergence.h"

namespace distillx {
namespace {

template <typename T>
struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

}  // namespace

void cuda::divergence_rows(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight,
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

namespace {

std::tuple<at::Tensor, at::Tensor> logit_divergence_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                         const std::optional<at::Tensor>& row_weight,
                                                         double temperature, int64_t divergence, double beta,
                                                         bool compute_grad) {
  return logit_divergence_host(
      student, teacher, row_weight, temperature, divergence, beta, compute_grad,
      [&](const at::Tensor& s, const at::Tensor& t, const at::Tensor& w, const at::Tensor& loss, const at::Tensor& grad) {
        cuda::divergence_rows(s, t, w, loss, grad, temperature, divergence, beta);
      },
      [](at::IntArrayRef sizes, const at::TensorOptions& o) { return at::empty(sizes, o); });
}

}  // namespace

TORCH_LIBRARY_IMPL(distillx, CUDA, m) {
  m.impl("logit_divergence", &logit_divergence_cuda);
}

}  // namespace distillx
