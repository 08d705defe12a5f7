// Attention transfer's channel reduction on CUDA, raw pointers (no torch headers), on the unit-scaled
// feature (m_b = max |f[b]|, so |f/m|^p cannot overflow for any p):
//   forward  a[b, s] = (1/C) Σ_c |f[b, c, s] / m_b|^p   one thread per (b, s), coalesced over s, keeping a
//            running maximum of its column (rescaling its sum when it grows, as online softmax does);
//            then one block per sample finds m_b from the column maxima and rescales the sample's map
//   backward ∂f[b, c, s] = g[b, s] · (p/C) · |f/m_b|^(p−1) · sign(f) / m_b   (0 at f = 0), elementwise
// One streaming pass over the (B, C, S) feature map each way, as on the CPU. Maxima are taken on bit
// patterns and float divisions by m split m into mantissa and exponent (UnitScale), so subnormal
// features are exact under the build's --use_fast_math (flush-to-zero) and no 1/m overflows.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace distillx {
namespace cuda {

template <typename T>
__host__ __device__ __forceinline__ T abs_pow(T x, T p) {
  return p == T(2) ? x * x : (p == T(1) ? fabs(x) : pow(fabs(x), p));
}

// |f| as its bit pattern (sign cleared): for non-negative values the bits order like the values,
// subnormals included, with inf above every finite value and NaN above inf. The kernels find maxima
// and compare on these keys because the build's --use_fast_math makes every float operation
// flush-to-zero (abs, compares and conversions too): a subnormal |f| (features ~1e-39) read as a
// float is 0, and a sample of them was taken for an all-zero one. Integer operations are not flushed.
__host__ __device__ __forceinline__ uint32_t abs_key(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x) & 0x7fffffffu;
#else
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u & 0x7fffffffu;
#endif
}

__host__ __device__ __forceinline__ uint64_t abs_key(double x) {
#ifdef __CUDA_ARCH__
  return static_cast<uint64_t>(__double_as_longlong(x)) & 0x7fffffffffffffffull;
#else
  uint64_t u;
  memcpy(&u, &x, sizeof u);
  return u & 0x7fffffffffffffffull;
#endif
}

__host__ __device__ __forceinline__ float from_key(uint32_t k) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(k);
#else
  float x;
  memcpy(&x, &k, sizeof x);
  return x;
#endif
}

__host__ __device__ __forceinline__ double from_key(uint64_t k) {
#ifdef __CUDA_ARCH__
  return __longlong_as_double(static_cast<long long>(k));
#else
  double x;
  memcpy(&x, &k, sizeof x);
  return x;
#endif
}

template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
  static constexpr uint32_t kInf = 0x7f800000u;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
  static constexpr uint64_t kInf = 0x7ff0000000000000ull;
};

// Division by m > 0 (a column's or sample's max |f|, given as its key), for |f / m|^p and the
// backward's y / m. double is not flushed: plain division (IEEE: a subnormal m is exact, where 1/m
// would overflow to inf and make 0 · inf = NaN).
template <typename T>
struct UnitScale;

template <>
struct UnitScale<double> {
  double m;
  __host__ __device__ explicit UnitScale(uint64_t mk) : m(from_key(mk)) {}
  // |x / m|^p for the key x <= m (NaN where m is, or x and m are inf)
  __host__ __device__ double pow(uint64_t xk, double p) const { return abs_pow(from_key(xk) / m, p); }
  __host__ __device__ double div(double y) const { return y / m; }
};

// float: m = mant · 2^exp with mant in [1, 2), split with integer operations (a subnormal m is
// normalised by its leading zeros), so that no float operation sees a subnormal operand, and no
// division a divisor above 2^126 (fast-math's div.approx returns 0 there).
template <>
struct UnitScale<float> {
  uint32_t mk;
  float mant;
  int exp;

  __host__ __device__ static int leading_zeros(uint32_t v) {
#ifdef __CUDA_ARCH__
    return __clz(v);
#else
    return v ? __builtin_clz(v) : 32;
#endif
  }
  // 2^e as a float for -126 <= e <= 127, 0 below (where a result would be flushed anyway)
  __host__ __device__ static float pow2(int e) {
    return e < -126 ? 0.f : from_key(static_cast<uint32_t>(e + 127) << 23);
  }
  // (mantissa in [1, 2), unbiased exponent) of the key of a finite value > 0
  __host__ __device__ static void split(uint32_t k, float& mant, int& exp) {
    uint32_t frac = k & 0x7fffffu;
    int e = static_cast<int>(k >> 23);
    if (e == 0) {  // subnormal: frac · 2^-149; shift its leading 1 to bit 23
      const int shift = leading_zeros(frac) - 8;
      frac = (frac << shift) & 0x7fffffu;
      e = 1 - shift;
    }
    mant = from_key(0x3f800000u | frac);
    exp = e - 127;
  }

  __host__ __device__ explicit UnitScale(uint32_t k) : mk(k), mant(1.f), exp(0) {
    if (k != 0 && k < KeyOf<float>::kInf) split(k, mant, exp);
  }

  // |x / m|^p for the key x <= m, as (q · 2^d)^p with q = mant_x / mant_m in (1/2, 2), d <= 0: finite
  // and unflushed for any p (exp2 of p · log2 for p other than 1 and 2, as powf is under fast math);
  // NaN where m is NaN or x and m are inf, 0 for x = 0 or a finite x under an infinite m.
  __host__ __device__ float pow(uint32_t xk, float p) const {
    if (mk >= KeyOf<float>::kInf) {
      return (mk > KeyOf<float>::kInf || xk >= KeyOf<float>::kInf) ? from_key(0x7fc00000u) : 0.f;
    }
    if (xk == 0) return 0.f;
    float xm;
    int xe;
    split(xk, xm, xe);
    const float q = xm / mant;
    const int d = xe - exp;
    if (p == 2.f) return q * q * pow2(2 * d);
    if (p == 1.f) return q * pow2(d);
    return exp2f(p * (log2f(q) + static_cast<float>(d)));
  }

  // y / m: y / mant, then two exact power-of-two steps of the same sign (each within float's normal
  // range, so only a result beyond it overflows or is flushed); y · 0 for an infinite m, NaN for NaN.
  __host__ __device__ float div(float y) const {
    if (mk >= KeyOf<float>::kInf) return mk > KeyOf<float>::kInf ? from_key(0x7fc00000u) : y * 0.f;
    const int h = -exp / 2;
    return y / mant * pow2(h) * pow2(-exp - h);
  }
};

// The kernels' arithmetic, one column, sample or element at a time: __host__ too, so that
// tests/cuda/attention_map_host_check.cu runs it on the CPU with flush-to-zero on, as fast math has it.

// One column f[0], f[stride], ... (C entries): acc = Σ_c |f_c / m|^p with m its max |f| as a key
// (rescaling the sum when the running maximum grows, as online softmax does); NaN sum and key if any
// entry is NaN.
template <typename T>
__host__ __device__ void column_unit_sum(const T* col, int64_t C, int64_t stride, T p, T& sum,
                                         typename KeyOf<T>::type& max_key) {
  using Key = typename KeyOf<T>::type;
  T acc = 0;
  Key m = 0;
  UnitScale<T> unit(m);
  for (int64_t c = 0; c < C; ++c) {
    const Key v = abs_key(col[c * stride]);
    if (v > KeyOf<T>::kInf) {  // NaN: the sample's map is NaN (this column's too: equal keys skip the rescale)
      m = v;
      acc = from_key(v);
      break;
    }
    if (v > m) {
      const UnitScale<T> grown(v);
      if (m > 0) acc *= grown.pow(m, p);  // the sum so far was of |f / m|^p
      m = v;
      unit = grown;
    }
    if (m > 0) acc += unit.pow(v, p);
  }
  sum = acc;
  max_key = m;
}

// The factor (m_col / m_b)^p / C that puts a column's sum on the sample's maximum (keys; NaN when m_b is).
template <typename T>
__host__ __device__ T column_factor(typename KeyOf<T>::type col_key, typename KeyOf<T>::type sample_key,
                                    const UnitScale<T>& sample_unit, T p, T inv_c) {
  return (col_key == sample_key ? T(1) : sample_unit.pow(col_key, p)) * inv_c;
}

// ∂f = (g · (p/C) · |f/m|^(p−1) · sign(f)) / m, the last division after the product (as the
// reference's autograd has it), so a subnormal m gives the large finite gradient, not 0 · inf;
// 0 at f = 0 (where the derivative is 0 for p > 1). q = p − 1, or 1 for p = 2 (|v|·sign(f) = v).
template <typename T>
__host__ __device__ T unit_grad(T f, T g, const UnitScale<T>& unit, T q, T p_over_c) {
  const auto fk = abs_key(f);
  const T d = fk == 0 ? T(0) : copysign(unit.pow(fk, q), f);
  return unit.div(d * g * p_over_c);
}

// Column sums of |f / m_col|^p and the column maxima m_col (NaN if the column has a NaN).
template <typename T>
__global__ void attention_map_columns_kernel(const T* __restrict__ f, T* __restrict__ a, T* __restrict__ col_max,
                                             int64_t B, int64_t C, int64_t S, T p) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < B * S;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / S, s = idx % S;
    typename KeyOf<T>::type m;
    column_unit_sum(f + b * C * S + s, C, S, p, a[idx], m);
    col_max[idx] = from_key(m);
  }
}

// One block per sample: m_b = max of its column maxima (NaN if any is), the map rescaled by
// (m_col / m_b)^p / C, and scale[b] = m_b (1 for an all-zero sample).
template <typename T, int kThreads>
__global__ void attention_map_rescale_kernel(T* __restrict__ a, const T* __restrict__ col_max, T* __restrict__ scale,
                                             int64_t S, int64_t C, T p) {
  using Key = typename KeyOf<T>::type;
  __shared__ Key partial[kThreads];
  const int64_t b = blockIdx.x;
  const T* cm = col_max + b * S;
  Key m = 0;
  for (int64_t s = threadIdx.x; s < S; s += kThreads) {
    const Key k = abs_key(cm[s]);
    m = k > m ? k : m;  // a NaN's key is above every other
  }
  partial[threadIdx.x] = m;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const Key other = partial[threadIdx.x + stride];
      if (other > partial[threadIdx.x]) partial[threadIdx.x] = other;
    }
    __syncthreads();
  }
  const Key mb = partial[0];
  const UnitScale<T> unit(mb);
  const T inv_c = T(1) / static_cast<T>(C > 0 ? C : 1);
  for (int64_t s = threadIdx.x; s < S; s += kThreads) a[b * S + s] *= column_factor(abs_key(cm[s]), mb, unit, p, inv_c);
  if (threadIdx.x == 0) scale[b] = mb == 0 ? T(1) : from_key(mb);
}

template <typename T>
__global__ void attention_map_backward_kernel(const T* __restrict__ g, const T* __restrict__ f,
                                              const T* __restrict__ scale, T* __restrict__ df, int64_t B, int64_t C,
                                              int64_t S, T p) {
  const T p_over_c = p / static_cast<T>(C > 0 ? C : 1);
  const T q = p == T(2) ? T(1) : p - T(1);
  const int64_t total = B * C * S;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = idx % S, b = idx / (C * S);
    df[idx] = unit_grad(f[idx], g[b * S + s], UnitScale<T>(abs_key(scale[b])), q, p_over_c);
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
