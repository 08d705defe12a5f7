// CUDA kernels of attention transfer (distillx::attention_map and its backward): checks here, the
// streaming kernels in include/distillx/cuda/attention_map.cuh, launched on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "distillx/attention_map.h"
#include "distillx/cuda/attention_map.cuh"

namespace distillx {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_map_cuda(const at::Tensor& feature, double p) {
  check_attention_map(feature, p);
  const c10::cuda::CUDAGuard guard(feature.device());
  const at::Tensor f = feature.contiguous();
  const int64_t B = f.size(0), C = f.size(1), S = f.size(2) * f.size(3);
  at::Tensor out = at::empty({B, f.size(2), f.size(3)}, f.options());
  at::Tensor scale = at::ones({B}, f.options());
  if (out.numel() == 0) return {out, scale};
  at::Tensor col_max = at::empty({B, S}, f.options());
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "distillx_attention_map_cuda", [&] {
    cuda::launch_attention_map<scalar_t>(f.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                         scale.mutable_data_ptr<scalar_t>(), col_max.mutable_data_ptr<scalar_t>(), B,
                                         C, S, static_cast<scalar_t>(p), at::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, scale};
}

at::Tensor attention_map_backward_cuda(const at::Tensor& grad_map, const at::Tensor& feature, const at::Tensor& scale,
                                       double p) {
  const at::Tensor m = attention_map_scale(grad_map, feature, scale, p);
  const c10::cuda::CUDAGuard guard(feature.device());
  const at::Tensor f = feature.contiguous();
  const int64_t B = f.size(0), C = f.size(1), S = f.size(2) * f.size(3);
  const at::Tensor g = grad_map.to(f.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(f);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "distillx_attention_map_backward_cuda", [&] {
    cuda::launch_attention_map_backward<scalar_t>(g.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(),
                                                  m.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), B,
                                                  C, S, static_cast<scalar_t>(p), at::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(distillx, CUDA, m) {
  m.impl("attention_map", &attention_map_cuda);
  m.impl("attention_map_backward", &attention_map_backward_cuda);
}

}  // namespace distillx
