// Attention transfer's channel reduction on CUDA, raw pointers (no torch headers), on the unit-scaled
// feature (m_b = max |f[b]|, so |f/m|^p cannot overflow for any p):
//   forward  a[b, s] = (1/C) Σ_c |f[b, c, s] / m_b|^p   one thread per (b, s), coalesced over s, keeping a
//            running maximum of its column (rescaling its sum when it grows, as online softmax does);
//            then one block per sample finds m_b from the column maxima and rescales the sample's map
//   backward ∂f[b, c, s] = g[b, s] · (p/C) · |f/m_b|^(p−1) · sign(f) / m_b   (0 at f = 0), elementwise
// One streaming pass over the (B, C, S) feature map each way, as on the CPU.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace distillx {
namespace cuda {

template <typename T>
__device__ __forceinline__ T abs_pow(T x, T p) {
  return p == T(2) ? x * x : (p == T(1) ? fabs(x) : pow(fabs(x), p));
}

template <typename T>
__device__ __forceinline__ T pow_p(T x, T p) {
  return p == T(2) ? x * x : pow(x, p);
}

// Column sums of |f / m_col|^p and the column maxima m_col (NaN if the column has a NaN).
template <typename T>
__global__ void attention_map_columns_kernel(const T* __restrict__ f, T* __restrict__ a, T* __restrict__ col_max,
                                             int64_t B, int64_t C, int64_t S, T p) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < B * S;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / S, s = idx % S;
    const T* col = f + b * C * S + s;
    T acc = 0, m = 0;
    for (int64_t c = 0; c < C; ++c) {
      const T v = fabs(col[c * S]);
      if (isnan(v)) {
        m = v;
        break;
      }
      if (v > m) {
        if (m > T(0)) acc *= pow_p(m / v, p);  // the sum so far was of |f / m|^p
        m = v;
      }
      if (m > T(0)) acc += abs_pow(v / m, p);
    }
    a[idx] = acc;
    col_max[idx] = m;
  }
}

// One block per sample: m_b = max of its column maxima (NaN if any is), the map rescaled by
// (m_col / m_b)^p / C, and scale[b] = m_b (1 for an all-zero sample).
template <typename T, int kThreads>
__global__ void attention_map_rescale_kernel(T* __restrict__ a, const T* __restrict__ col_max, T* __restrict__ scale,
                                             int64_t S, int64_t C, T p) {
  __shared__ T partial[kThreads];
  const int64_t b = blockIdx.x;
  const T* cm = col_max + b * S;
  T m = 0;
  for (int64_t s = threadIdx.x; s < S; s += kThreads) m = (isnan(cm[s]) || cm[s] > m) ? cm[s] : m;
  partial[threadIdx.x] = m;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const T other = partial[threadIdx.x + stride];
      if (isnan(other) || other > partial[threadIdx.x]) partial[threadIdx.x] = other;
    }
    __syncthreads();
  }
  const T mb = partial[0];
  const T inv_c = T(1) / static_cast<T>(C > 0 ? C : 1);
  for (int64_t s = threadIdx.x; s < S; s += kThreads) {
    const T mk = cm[s];
    a[b * S + s] *= (mk == mb ? T(1) : pow_p(mk / mb, p)) * inv_c;  // NaN when mb is
  }
  if (threadIdx.x == 0) scale[b] = mb == T(0) ? T(1) : mb;
}

template <typename T>
__global__ void attention_map_backward_kernel(const T* __restrict__ g, const T* __restrict__ f,
                                              const T* __restrict__ scale, T* __restrict__ df, int64_t B, int64_t C,
                                              int64_t S, T p) {
  const T p_over_c = p / static_cast<T>(C > 0 ? C : 1);
  const int64_t total = B * C * S;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = idx % S, b = idx / (C * S);
    const T inv = T(1) / scale[b];
    const T v = f[idx] * inv;
    const T d = p == T(2) ? v : (v == T(0) ? T(0) : copysign(pow(fabs(v), p - T(1)), v));
    df[idx] = d * g[b * S + s] * p_over_c * inv;
  }
}

inline int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

// col_max: a (B, S) workspace.
template <typename T>
void launch_attention_map(const T* f, T* a, T* scale, T* col_max, int64_t B, int64_t C, int64_t S, T p,
                          cudaStream_t stream) {
  constexpr int kThreads = 256;
  attention_map_columns_kernel<T><<<grid_for(B * S, kThreads), kThreads, 0, stream>>>(f, a, col_max, B, C, S, p);
  attention_map_rescale_kernel<T, kThreads><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(a, col_max, scale, S,
                                                                                              C, p);
}

template <typename T>
void launch_attention_map_backward(const T* g, const T* f, const T* scale, T* df, int64_t B, int64_t C, int64_t S,
                                   T p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  attention_map_backward_kernel<T>
      <<<grid_for(B * C * S, kThreads), kThreads, 0, stream>>>(g, f, scale, df, B, C, S, p);
}

}  // namespace cuda
}  // namespace distillx
