// Attention transfer's channel reduction on CUDA, raw pointers (no torch headers):
//   forward  a[b, s] = (1/C) Σ_c |f[b, c, s]|^p          one thread per (b, s), coalesced over s
//   backward ∂f[b, c, s] = g[b, s] · (p/C) · |f|^(p−1) · sign(f)   (0 at f = 0), elementwise
// Both are one streaming pass over the (B, C, S) feature map, as on the CPU.
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
__global__ void attention_map_kernel(const T* __restrict__ f, T* __restrict__ a, int64_t B, int64_t C, int64_t S,
                                     T p) {
  const T inv_c = T(1) / static_cast<T>(C > 0 ? C : 1);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < B * S;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / S, s = idx % S;
    const T* col = f + b * C * S + s;
    T acc = 0;
    for (int64_t c = 0; c < C; ++c) acc += abs_pow(col[c * S], p);
    a[idx] = acc * inv_c;
  }
}

template <typename T>
__global__ void attention_map_backward_kernel(const T* __restrict__ g, const T* __restrict__ f, T* __restrict__ df,
                                              int64_t B, int64_t C, int64_t S, T p) {
  const T scale = p / static_cast<T>(C > 0 ? C : 1);
  const int64_t total = B * C * S;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = idx % S, b = idx / (C * S);
    const T v = f[idx];
    const T d = p == T(2) ? v : (v == T(0) ? T(0) : copysign(pow(fabs(v), p - T(1)), v));
    df[idx] = d * g[b * S + s] * scale;
  }
}

inline int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

template <typename T>
void launch_attention_map(const T* f, T* a, int64_t B, int64_t C, int64_t S, T p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  attention_map_kernel<T><<<grid_for(B * S, kThreads), kThreads, 0, stream>>>(f, a, B, C, S, p);
}

template <typename T>
void launch_attention_map_backward(const T* g, const T* f, T* df, int64_t B, int64_t C, int64_t S, T p,
                                   cudaStream_t stream) {
  constexpr int kThreads = 256;
  attention_map_backward_kernel<T><<<grid_for(B * C * S, kThreads), kThreads, 0, stream>>>(g, f, df, B, C, S, p);
}

}  // namespace cuda
}  // namespace distillx
