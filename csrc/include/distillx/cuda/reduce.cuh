// Block-wide reductions for row kernels (one block per row). Raw CUDA, no torch headers, so nvcc
// can compile the kernels without a CUDA build of torch.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

namespace distillx {
namespace cuda {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Online-softmax state: running max m and Σ exp(x − m).
template <typename T>
struct MaxSum {
  T m, s;
};

template <typename T>
__device__ __forceinline__ MaxSum<T> combine(MaxSum<T> a, MaxSum<T> b) {
  const T m = a.m > b.m ? a.m : b.m;
  if (m == -INFINITY) return {m, T(0)};  // both empty: avoid exp(−inf − −inf) = NaN
  return {m, a.s * exp(a.m - m) + b.s * exp(b.m - m)};
}

template <typename T>
__device__ __forceinline__ MaxSum<T> warp_max_sum(MaxSum<T> v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    MaxSum<T> other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = combine(v, other);
  }
  return v;
}

// Sum over the block; every thread gets the result. `shared` holds blockDim.x / 32 values.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // `shared` may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : T(0);
  return warp_sum(v);
}

template <typename T>
__device__ MaxSum<T> block_max_sum(MaxSum<T> v, T* shared_m, T* shared_s) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_max_sum(v);
  __syncthreads();
  if (lane == 0) {
    shared_m[warp] = v.m;
    shared_s[warp] = v.s;
  }
  __syncthreads();
  v = lane < warps ? MaxSum<T>{shared_m[lane], shared_s[lane]} : MaxSum<T>{T(-INFINITY), T(0)};
  return warp_max_sum(v);
}

}  // namespace cuda
}  // namespace distillx
