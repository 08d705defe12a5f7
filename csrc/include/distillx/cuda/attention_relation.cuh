// MiniLM attention-relation loss on CUDA, raw pointers (the CPU twin is csrc/cpu/attention_relation.cpp).
// The host computes (rows, nk) score tiles of both sides with batched GEMMs; these kernels do the
// per-row work, one warp per query row:
//   relation_update   fold one key block into the row's online-softmax state {m_s, l_s, m_t, l_t, A}
//                     (A = Σ e^(z_t − m_t)((z_t − m_t) − (z_s − m_s)), rescaled as maxima grow)
//   relation_finish   KL = A/l_t − log l_t + log l_s for valid rows into *total; lse_s, lse_t saved
//   relation_grad     ∂z_s = scale·(e^(z_s − lse_s) − e^(z_t − lse_t)) in place, 0 for padded rows/keys
// Rows r of a tile are (ba, i) = (r / n, r % n) for batch·head ba0 + ba and query i0 + i; keys are
// j0 + j. key_mask (B, L) bool (null: every token is real), A heads per batch element.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "distillx/cuda/reduce.cuh"

namespace distillx {
namespace cuda {

struct RelationTile {
  int64_t ba0, rows, n, nk, i0, j0, A, L;
  const bool* key_mask;
};

__device__ __forceinline__ bool real_token(const RelationTile& t, int64_t ba, int64_t pos) {
  return t.key_mask == nullptr || t.key_mask[((t.ba0 + ba) / t.A) * t.L + pos];
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const T other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

// state: 5 arrays of `rows` values (ms, ls, mt, lt, acc), initialised to (−inf, 0, −inf, 0, 0).
template <typename T>
__global__ void relation_update_kernel(const T* __restrict__ zs, const T* __restrict__ zt, RelationTile t,
                                       T* __restrict__ state) {
  const int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= t.rows) return;
  const int64_t ba = r / t.n;
  const T* s = zs + r * t.nk;
  const T* u = zt + r * t.nk;
  T bs = -INFINITY, bt = -INFINITY;
  for (int64_t j = lane; j < t.nk; j += kWarp) {
    if (!real_token(t, ba, t.j0 + j)) continue;
    bs = fmax(bs, s[j]);
    bt = fmax(bt, u[j]);
  }
  bs = warp_max(bs);
  bt = warp_max(bt);
  T* ms = state + r;
  T* ls = state + t.rows + r;
  T* mt = state + 2 * t.rows + r;
  T* lt = state + 3 * t.rows + r;
  T* acc = state + 4 * t.rows + r;
  if (bt == -INFINITY) return;  // every key of this block is padding
  const T ms_new = fmax(*ms, bs), mt_new = fmax(*mt, bt);
  T es = 0, et = 0, ea = 0;
  for (int64_t j = lane; j < t.nk; j += kWarp) {
    if (!real_token(t, ba, t.j0 + j)) continue;
    const T a = s[j] - ms_new, b = u[j] - mt_new, e = exp(b);
    es += exp(a);
    et += e;
    ea += e * (b - a);
  }
  es = warp_sum(es);
  et = warp_sum(et);
  ea = warp_sum(ea);
  if (lane == 0) {
    if (*lt > 0) {
      const T rescale = exp(*mt - mt_new);
      *acc = rescale * (*acc + ((ms_new - *ms) - (mt_new - *mt)) * *lt);
      *lt *= rescale;
      *ls *= exp(*ms - ms_new);
    }
    *ls += es;
    *lt += et;
    *acc += ea;
    *ms = ms_new;
    *mt = mt_new;
  }
}

// stats: (BA, L, 2) {lse_s, lse_t}; total: the KL sum over valid rows (float64).
template <typename T>
__global__ void relation_finish_kernel(const T* __restrict__ state, RelationTile t, T* __restrict__ stats,
                                       double* __restrict__ total) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= t.rows) return;
  const int64_t ba = r / t.n, i = r % t.n;
  if (!real_token(t, ba, t.i0 + i)) return;
  const T ms = state[r], ls = state[t.rows + r], mt = state[2 * t.rows + r], lt = state[3 * t.rows + r];
  const T acc = state[4 * t.rows + r];
  T* out = stats + ((t.ba0 + ba) * t.L + t.i0 + i) * 2;
  out[0] = ms + log(ls);
  out[1] = mt + log(lt);
  atomicAdd(total, static_cast<double>(acc / lt - log(lt) + log(ls)));
}

template <typename T>
__global__ void relation_grad_kernel(T* __restrict__ zs, const T* __restrict__ zt, RelationTile t,
                                     const T* __restrict__ stats, T scale) {
  const int64_t total = t.rows * t.nk;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / t.nk, j = idx % t.nk, ba = r / t.n, i = r % t.n;
    if (!real_token(t, ba, t.i0 + i) || !real_token(t, ba, t.j0 + j)) {
      zs[idx] = 0;
      continue;
    }
    const T* lse = stats + ((t.ba0 + ba) * t.L + t.i0 + i) * 2;
    zs[idx] = scale * (exp(zs[idx] - lse[0]) - exp(zt[idx] - lse[1]));
  }
}

template <typename T>
void launch_relation_update(const T* zs, const T* zt, const RelationTile& t, T* state, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = (t.rows * kWarp + kThreads - 1) / kThreads;
  relation_update_kernel<T><<<static_cast<int>(blocks), kThreads, 0, stream>>>(zs, zt, t, state);
}

template <typename T>
void launch_relation_finish(const T* state, const RelationTile& t, T* stats, double* total, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = (t.rows + kThreads - 1) / kThreads;
  relation_finish_kernel<T><<<static_cast<int>(blocks), kThreads, 0, stream>>>(state, t, stats, total);
}

template <typename T>
void launch_relation_grad(T* zs, const T* zt, const RelationTile& t, const T* stats, T scale, cudaStream_t stream) {
  constexpr int kThreads = 256;
  int64_t blocks = (t.rows * t.nk + kThreads - 1) / kThreads;
  blocks = blocks > 65535 * 8 ? 65535 * 8 : (blocks < 1 ? 1 : blocks);
  relation_grad_kernel<T><<<static_cast<int>(blocks), kThreads, 0, stream>>>(zs, zt, t, stats, scale);
}

}  // namespace cuda
}  // namespace distillx
