// The elementwise part of one kernel-Gram panel on CUDA (the CPU twin is panel_cpu_typed in
// csrc/cpu/kernel_gram.cpp; the panel loop and GEMMs are include/distillx/kernel_gram.h). Raw pointers.
// One thread per panel entry (i, j): both kernels from the GEMM results, then by mode
//   plain:    Σ w_j D_ij² (w = 1 in the diagonal block, 2 right of it) into *total; with grad,
//             gs ← D ∘ ∂k_s/∂g (and g1s ← D ∘ ∂k_s/∂g₁ for chebyshev)
//   MMD:      D_ij = a_i a_j, the sum Σ w_j a_i a_j k_ij
//   stats:    row/column sums of Ks², Kt², Ks·Kt into the float64 (·, 3) statistics
//   normgrad: D_ij = ½((γ_i + γ_j) Ks_ij − (α_i + α_j) Kt_ij) with (·, 2) coefficients {γ, α}
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "distillx/cuda/reduce.cuh"

namespace distillx {
namespace cuda {

enum PanelKind : int { kPanelLinear = 0, kPanelPolynomial = 1, kPanelRBF = 2, kPanelChebyshev = 3 };
enum PanelModeCuda : int { kModePlain = 0, kModeStats = 1, kModeNormGrad = 2 };

template <typename T>
struct SideParams {
  T p0, p1, p2;
};

template <typename T>
__device__ __forceinline__ T side_kernel(int kernel, SideParams<T> q, T g, T g1, T nsum, T* dk, T* dk1) {
  switch (kernel) {
    case kPanelPolynomial: {
      const T base = g * q.p0 + q.p1;
      if (dk) *dk = pow(base, q.p2 - T(1)) * q.p2 * q.p0;
      return pow(base, q.p2);
    }
    case kPanelRBF: {
      const T d2 = fmax(nsum - g - g, T(0));
      const T k = exp(-q.p0 * d2);
      if (dk) *dk = k * T(2) * q.p0;
      return k;
    }
    case kPanelChebyshev: {
      const T u = (T(1) - g1 / q.p0) + q.p1;
      const T r = rsqrt(u);
      const T k = g * r / q.p0;
      if (dk) *dk = r / q.p0;
      if (dk1) *dk1 = k / u * (T(0.5) / q.p0);
      return k;
    }
    default:
      if (dk) *dk = T(1);
      return g;
  }
}

template <typename T>
struct PanelPointers {
  T* gs;
  const T* gt;   // null in MMD mode
  T* g1s;        // chebyshev only
  const T* g1t;
  const T *nsi, *nsp, *nti, *ntp;  // rbf squared norms of panel rows / columns
  const T *wi, *wp;                // MMD row weights
  double *stats_i, *stats_p;       // stats mode, (·, 3)
  const T *coef_i, *coef_p;        // normgrad mode, (·, 2)
};

template <typename T>
__global__ void gram_panel_kernel(PanelPointers<T> ptr, int kernel, SideParams<T> ps, SideParams<T> pt, int64_t B,
                                  int64_t P, int64_t diag, int mode, bool grad, double* total) {
  __shared__ double shared[32];
  const bool mmd = ptr.wi != nullptr, rbf = kernel == kPanelRBF, cheb = kernel == kPanelChebyshev;
  double local = 0;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < B * P;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / P, j = idx % P;
    const T g = ptr.gs[idx];
    const T g1 = cheb ? ptr.g1s[idx] : T(0);
    const T ns = rbf ? ptr.nsi[i] + ptr.nsp[j] : T(0);
    T dk = 0, dk1 = 0;
    const T k = side_kernel(kernel, ps, g, g1, ns, grad ? &dk : nullptr, grad && cheb ? &dk1 : nullptr);
    const double w = j < diag ? 1.0 : 2.0;
    T d;
    if (mmd) {
      d = ptr.wi[i] * ptr.wp[j];
      local += w * static_cast<double>(d * k);
    } else {
      const T h1 = cheb ? ptr.g1t[idx] : T(0);
      const T nt = rbf ? ptr.nti[i] + ptr.ntp[j] : T(0);
      const T kt = side_kernel<T>(kernel, pt, ptr.gt[idx], h1, nt, nullptr, nullptr);
      if (mode == kModeStats) {
        const double a = k, b = kt;
        atomicAdd(ptr.stats_i + 3 * i, a * a);
        atomicAdd(ptr.stats_i + 3 * i + 1, b * b);
        atomicAdd(ptr.stats_i + 3 * i + 2, a * b);
        if (j >= diag) {  // right of the diagonal block: also row j's statistics, by symmetry
          atomicAdd(ptr.stats_p + 3 * j, a * a);
          atomicAdd(ptr.stats_p + 3 * j + 1, b * b);
          atomicAdd(ptr.stats_p + 3 * j + 2, a * b);
        }
        continue;
      }
      if (mode == kModeNormGrad) {
        d = T(0.5) * ((ptr.coef_i[2 * i] + ptr.coef_p[2 * j]) * k - (ptr.coef_i[2 * i + 1] + ptr.coef_p[2 * j + 1]) * kt);
      } else {
        d = k - kt;
        local += w * static_cast<double>(d) * static_cast<double>(d);
      }
    }
    if (grad) {
      ptr.gs[idx] = d * dk;
      if (cheb) ptr.g1s[idx] = d * dk1;
    }
  }
  if (mode != kModeStats) {
    const double sum = block_sum(local, shared);
    if (threadIdx.x == 0) atomicAdd(total, sum);
  }
}

template <typename T>
void launch_gram_panel(const PanelPointers<T>& ptr, int kernel, SideParams<T> ps, SideParams<T> pt, int64_t B,
                       int64_t P, int64_t diag, int mode, bool grad, double* total, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t n = B * P;
  int64_t blocks = (n + kThreads - 1) / kThreads;
  blocks = blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks);
  gram_panel_kernel<T><<<static_cast<int>(blocks), kThreads, 0, stream>>>(ptr, kernel, ps, pt, B, P, diag, mode, grad,
                                                                          total);
}

}  // namespace cuda
}  // namespace distillx
