// CUDA kernels of the kernel-Gram family (distillx::kernel_gram, distillx::kernel_mmd): the panel
// loop, GEMMs (cuBLAS through ATen) and both ops' host code are include/distillx/kernel_gram.h; the
// elementwise part of a panel is the kernel of include/distillx/cuda/kernel_gram.cuh, launched on the
// current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "distillx/cuda/kernel_gram.cuh"
#include "distillx/kernel_gram.h"

namespace distillx {
namespace {

template <typename T>
cuda::SideParams<T> side_params(const std::vector<double>& p) {
  cuda::SideParams<T> q{0, 0, 0};
  if (p.size() > 0) q.p0 = static_cast<T>(p[0]);
  if (p.size() > 1) q.p1 = static_cast<T>(p[1]);
  if (p.size() > 2) q.p2 = static_cast<T>(p[2]);
  return q;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
double panel_cuda_typed(PanelArgs& a) {
  TORCH_CHECK(a.layout == kPanelRowsMajor, "distillx: the CUDA kernel_gram panel expects rows-major buffers");
  const bool stats = a.mode == kRowStats, normgrad = a.mode == kRowNormGrad;
  cuda::PanelPointers<T> ptr{};
  ptr.gs = a.gs.mutable_data_ptr<T>();
  ptr.gt = a.ai.defined() ? nullptr : a.gt.const_data_ptr<T>();
  ptr.g1s = a.g1s.defined() ? a.g1s.mutable_data_ptr<T>() : nullptr;
  ptr.g1t = a.ai.defined() ? nullptr : ptr_or_null<T>(a.g1t);
  ptr.nsi = ptr_or_null<T>(a.nsi), ptr.nsp = ptr_or_null<T>(a.nsp);
  ptr.nti = ptr_or_null<T>(a.nti), ptr.ntp = ptr_or_null<T>(a.ntp);
  ptr.wi = ptr_or_null<T>(a.ai), ptr.wp = ptr_or_null<T>(a.ap);
  ptr.stats_i = stats ? a.ri.mutable_data_ptr<double>() : nullptr;
  ptr.stats_p = stats ? a.rp.mutable_data_ptr<double>() : nullptr;
  ptr.coef_i = normgrad ? a.ri.const_data_ptr<T>() : nullptr;
  ptr.coef_p = normgrad ? a.rp.const_data_ptr<T>() : nullptr;
  at::Tensor total = at::zeros({}, a.gs.options().dtype(at::kDouble));
  cuda::launch_gram_panel<T>(ptr, static_cast<int>(a.kernel), side_params<T>(a.ps), side_params<T>(a.pt),
                             a.gs.size(0), a.gs.size(1), a.diag, a.mode, a.grad, total.mutable_data_ptr<double>(),
                             at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return stats ? 0.0 : total.item<double>();
}

double panel_cuda(PanelArgs& a) {
  return a.gs.scalar_type() == at::kDouble ? panel_cuda_typed<double>(a) : panel_cuda_typed<float>(a);
}

std::tuple<at::Tensor, at::Tensor> kernel_gram_cuda(const at::Tensor& s, const at::Tensor& t, int64_t kernel,
                                                    const at::Tensor& s_params, const at::Tensor& t_params,
                                                    bool normalize_rows, int64_t panel_rows, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(s.device());
  return kernel_gram_host(s, t, kernel, s_params, t_params, normalize_rows, panel_rows, compute_grad, panel_cuda);
}

std::tuple<at::Tensor, at::Tensor> kernel_mmd_cuda(const at::Tensor& s, const at::Tensor& t, const at::Tensor& weights,
                                                   int64_t kernel, const at::Tensor& params, int64_t panel_rows,
                                                   bool compute_grad) {
  const c10::cuda::CUDAGuard guard(s.device());
  return kernel_mmd_host(s, t, weights, kernel, params, panel_rows, compute_grad, panel_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(distillx, CUDA, m) {
  m.impl("kernel_gram", &kernel_gram_cuda);
  m.impl("kernel_mmd", &kernel_mmd_cuda);
}

}  // namespace distillx
