// CUDA row kernel of the logit divergence: one block per row, raw pointers only (no torch headers),
// float accumulation (double for double). Same math and conventions as include/distillx/cpu/logit_divergence.h:
//   p = softmax(t/T), q = softmax(s/T); forward KL ∂/∂s = T(q − p);
//   reverse KL ∂/∂s = T q (lq − lp − KL(q‖p)); JSD ∂/∂s = T(1−β) q (lq − lm − KL(q‖m)).
// Sweeps: (1) online max/Σexp of both rows, (2) loss (and the forward-KL gradient), (3) for
// reverse KL/JSD the gradient, which needs the row total from (2). Rows are re-read from L2.
// `grad` may alias `student`: each element is read and written by the same thread.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "distillx/cuda/reduce.cuh"

namespace distillx {
namespace cuda {

enum : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

template <typename T> __device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T, typename A> __device__ __forceinline__ A load_acc(T x) { return static_cast<A>(to_float(x)); }
template <> __device__ __forceinline__ double load_acc<double, double>(double x) { return x; }

template <typename T, typename A> __device__ __forceinline__ T store_as(A x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half store_as<__half, float>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16, float>(float x) { return __float2bfloat16(x); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Calls f(j, a, b) for every column j of the row, with a = s[j]/T and b = t[j]/T in acc precision;
// f returns the gradient value to store when `grad` is non-null. VEC elements per load when the
// rows are 16-byte aligned (the host checks), which is what reaches full memory bandwidth.
template <int VEC, typename T, typename A, typename F>
__device__ __forceinline__ void sweep(const T* s, const T* t, T* grad, int64_t C, A inv_t, F f) {
  const int64_t packs = C / VEC;
  for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) {
    const Pack<T, VEC> ps = reinterpret_cast<const Pack<T, VEC>*>(s)[k];
    const Pack<T, VEC> pt = reinterpret_cast<const Pack<T, VEC>*>(t)[k];
    Pack<T, VEC> pg;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      pg.v[e] = store_as<T, A>(f(k * VEC + e, load_acc<T, A>(ps.v[e]) * inv_t, load_acc<T, A>(pt.v[e]) * inv_t));
    }
    if (grad != nullptr) reinterpret_cast<Pack<T, VEC>*>(grad)[k] = pg;
  }
  for (int64_t j = packs * VEC + threadIdx.x; j < C; j += blockDim.x) {  // tail (VEC == 1: everything)
    const A g = f(j, load_acc<T, A>(s[j]) * inv_t, load_acc<T, A>(t[j]) * inv_t);
    if (grad != nullptr) grad[j] = store_as<T, A>(g);
  }
}

template <typename A>
__device__ __forceinline__ MaxSum<A> push(MaxSum<A> st, A x) {
  if (x == A(-INFINITY)) return st;
  if (x > st.m) return {x, st.s * exp(st.m - x) + A(1)};
  return {st.m, st.s + exp(x - st.m)};
}

template <typename A>
__device__ __forceinline__ A guarded(A w, A x) {  // w·x with 0·anything = 0; NaN in w propagates
  return w == A(0) ? A(0) : w * x;
}

// log(βp + (1−β)q) as a log-sum-exp of the log-probabilities (finite for denormal mixtures).
template <typename A>
__device__ __forceinline__ A log_mixture(A lp, A lq, A lb, A lb1) {
  const A x = lb + lp, y = lb1 + lq;
  const A m = x > y ? x : y;
  return m + log(exp(x - m) + exp(y - m));
}

template <typename T, typename A, int VEC>
__global__ void __launch_bounds__(1024) logit_divergence_kernel(const T* __restrict__ student, const T* __restrict__ teacher,
                                        const A* __restrict__ row_weight, A* __restrict__ loss, T* grad,
                                        int64_t C, A temperature, A beta, int divergence) {
  __shared__ A sh_a[32], sh_b[32], sh_c[32], sh_d[32];
  const int64_t row = blockIdx.x;
  const T* s = student + row * C;
  const T* t = teacher + row * C;
  T* g = grad == nullptr ? nullptr : grad + row * C;
  const A w = row_weight == nullptr ? A(1) : row_weight[row];
  const A inv_t = A(1) / temperature;
  auto zero_row = [&] {
    if (g != nullptr)
      for (int64_t j = threadIdx.x; j < C; j += blockDim.x) g[j] = store_as<T, A>(A(0));
    if (threadIdx.x == 0) loss[row] = A(0);
  };
  if (w == A(0)) {  // dropped row: its values are never read
    zero_row();
    return;
  }
  MaxSum<A> ms{A(-INFINITY), A(0)}, mt{A(-INFINITY), A(0)};
  sweep<VEC, T, A>(s, t, static_cast<T*>(nullptr), C, inv_t, [&](int64_t, A a, A b) {
    ms = push(ms, a);
    mt = push(mt, b);
    return A(0);
  });
  ms = block_max_sum(ms, sh_a, sh_b);
  mt = block_max_sum(mt, sh_c, sh_d);
  if (ms.m == A(-INFINITY) || mt.m == A(-INFINITY)) {  // no distribution on one side
    zero_row();
    return;
  }
  const A lse_s = ms.m + log(ms.s), lse_t = mt.m + log(mt.s);
  const A gscale = w * temperature;
  const bool jsd = divergence == kJSD;
  const bool p_term = jsd && beta != A(0);
  const bool q_term = !jsd || beta != A(1);
  const A qcoef = jsd ? A(1) - beta : A(1);
  const A lb = log(beta), lb1 = log1p(-beta);

  A part_p = 0, part_q = 0;
  if (divergence == kForwardKL) {
    sweep<VEC, T, A>(s, t, g, C, inv_t, [&](int64_t, A a, A b) {
      const A lq = a - lse_s, lp = b - lse_t;
      const A p = exp(lp), q = exp(lq);
      part_p += guarded(p, lp - lq);
      return gscale * (q - p);
    });
  } else {
    sweep<VEC, T, A>(s, t, static_cast<T*>(nullptr), C, inv_t, [&](int64_t, A a, A b) {
      const A lq = a - lse_s, lp = b - lse_t;
      const A p = exp(lp), q = exp(lq);
      const A ref = jsd ? log_mixture(lp, lq, lb, lb1) : lp;
      if (p_term) part_p += guarded(p, lp - ref);
      if (q_term) part_q += guarded(q, lq - ref);
      return A(0);
    });
  }
  const A total_p = block_sum(part_p, sh_a);
  const A inner = q_term && divergence != kForwardKL ? block_sum(part_q, sh_b) : A(0);
  if (divergence != kForwardKL && g != nullptr) {
    const A gq = q_term ? gscale * qcoef : A(0);
    sweep<VEC, T, A>(s, t, g, C, inv_t, [&](int64_t, A a, A b) {
      const A lq = a - lse_s, lp = b - lse_t;
      const A q = exp(lq);
      const A ref = jsd ? log_mixture(lp, lq, lb, lb1) : lp;
      return q_term ? gq * guarded(q, lq - ref - inner) : A(0);
    });
  }
  if (threadIdx.x == 0) {
    const A total = divergence == kForwardKL ? total_p : qcoef * inner + (p_term ? beta * total_p : A(0));
    loss[row] = w * temperature * temperature * total;
  }
}

// Launches one block per row on `stream`. Rows must be contiguous (stride C).
template <typename T, typename A>
void launch_logit_divergence(const T* student, const T* teacher, const A* row_weight, A* loss, T* grad, int64_t N,
                             int64_t C, A temperature, A beta, int divergence, cudaStream_t stream) {
  if (N == 0) return;
  const int threads = C >= 8192 ? 1024 : (C >= 1024 ? 256 : 128);
  constexpr int kVec = 16 / sizeof(T);
  const auto aligned = [&](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (kVec > 1 && C % kVec == 0 && aligned(student) && aligned(teacher) && aligned(grad)) {
    logit_divergence_kernel<T, A, kVec><<<N, threads, 0, stream>>>(student, teacher, row_weight, loss, grad, C,
                                                                   temperature, beta, divergence);
  } else {
    logit_divergence_kernel<T, A, 1><<<N, threads, 0, stream>>>(student, teacher, row_weight, loss, grad, C,
                                                                temperature, beta, divergence);
  }
}

}  // namespace cuda
}  // namespace distillx
