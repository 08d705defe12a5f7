// CPU kernels of attention transfer (AT) on the unit-scaled feature: the channel reduction
// a[b, hw] = mean_c |f[b, c, hw] / m_b|^p of a (B, C, H, W) map, m_b = max |f[b]| (so |f/m|^p cannot
// overflow for any p), and its backward ∂a/∂f = (p/C)·|f/m|^(p−1)·sign(f)/m with m a constant.
// Each is one streaming pass over the feature map: the forward keeps a running maximum per task and
// rescales its accumulator when the maximum grows (online softmax's trick), reading each row chunk a
// second time from L1; the tasks of one sample agree on m_b in a pass over the small (B, H, W) map.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "distillx/attention_map.h"
#include "distillx/cpu/memory.h"

namespace distillx {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline Vec<T> abs_pow(const Vec<T>& x, T p) {
  return p == T(2) ? x * x : (p == T(1) ? x.abs() : x.abs().pow(Vec<T>(p)));
}

template <typename T>
inline T pow_p(T x, T p) {
  return p == T(2) ? x * x : std::pow(x, p);
}

// x / m, as x · (1/m) when 1/m is a normal number, else (kDivide) as a true division: for a subnormal m
// (features of magnitude ~1e-39 in float32) 1/m overflows to inf and x · inf is inf or NaN, and near
// the top of the range 1/m is subnormal and has lost bits. Where 1/m is normal, x · (1/m) is within an
// ulp of x / m and cheaper.
template <typename T, bool kDivide>
struct Unscale {
  T m, inv;
  inline T operator()(T x) const { return kDivide ? x / m : x * inv; }
  inline Vec<T> operator()(const Vec<T>& x) const { return kDivide ? x / Vec<T>(m) : x * Vec<T>(inv); }
};

// Calls f(Unscale<T, kDivide>) with the kDivide that 1/m calls for (see Unscale).
template <typename T, typename F>
inline void with_unscale(T m, F&& f) {
  const T inv = T(1) / m;
  if (std::isnormal(inv)) {
    f(Unscale<T, false>{m, inv});
  } else {
    f(Unscale<T, true>{m, inv});
  }
}

// max_j |row[j]|, NaN when any entry is NaN.
template <typename T>
T max_abs(const T* row, int64_t n) {
  Vec<T> vm(T(0));
  int64_t j = 0;
  for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) vm = at::vec::maximum(vm, Vec<T>::loadu(row + j).abs());
  alignas(64) T lanes[Vec<T>::size()];
  vm.store(lanes);
  T m = T(0);
  for (int64_t k = 0; k < Vec<T>::size(); ++k) m = (std::isnan(lanes[k]) || lanes[k] > m) ? lanes[k] : m;
  for (; j < n && !std::isnan(m); ++j) m = (std::isnan(row[j]) || std::abs(row[j]) > m) ? std::abs(row[j]) : m;
  return m;
}

// Half-precision features are read as they are and converted a row block at a time into float
// scratch (no float32 copy of the feature map); map, scales and math are float32.
template <typename S, typename T>
inline const T* as_math(const S* src, int64_t n, T* scratch) {
  if constexpr (std::is_same_v<S, T>) {
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) scratch[j] = static_cast<T>(src[j]);
    return scratch;
  }
}

std::tuple<at::Tensor, at::Tensor> attention_map_cpu(const at::Tensor& feature, double p) {
  check_attention_map(feature, p, /*half=*/true);
  const at::Tensor f = feature.contiguous();
  const int64_t B = f.size(0), C = f.size(1), HW = f.size(2) * f.size(3);
  const auto math = f.options().dtype(at::toOpMathType(f.scalar_type()));
  at::Tensor out = at::empty({B, f.size(2), f.size(3)}, math);
  at::Tensor scale = at::empty({B}, math);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "distillx_attention_map_cpu", [&] {
    using S = scalar_t;
    using T = at::opmath_type<S>;
    const S* x = f.const_data_ptr<S>();
    T* a = out.mutable_data_ptr<T>();
    T* sc = scale.mutable_data_ptr<T>();
    // Columns per task: whole rows when they fit and there are samples enough for every thread (one
    // sequential stream per sample, which the prefetchers follow; half rows measured ~40% slower),
    // else rows split so that each thread gets work. The accumulator stays in L1.
    constexpr int64_t kMaxBlock = 4096;
    const int64_t want_tasks = 2 * static_cast<int64_t>(at::get_num_threads());
    int64_t block = std::min(kMaxBlock, std::max<int64_t>(HW, 1));
    if (B < want_tasks) {
      const int64_t split = (want_tasks + B - 1) / std::max<int64_t>(B, 1);
      block = std::max<int64_t>(64, ((HW + split - 1) / split + 15) / 16 * 16);
      block = std::min(block, kMaxBlock);
    }
    const int64_t blocks = (HW + block - 1) / block;
    const T pp = static_cast<T>(p), inv_c = T(1) / static_cast<T>(std::max<int64_t>(C, 1));
    std::vector<T> task_max(B * blocks);  // each task's m: its sum is of |f / m|^p
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      alignas(64) T acc[kMaxBlock];
      alignas(64) T conv[std::is_same_v<S, T> ? 1 : kMaxBlock];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, j0 = (task % blocks) * block, n = std::min(block, HW - j0);
        std::fill(acc, acc + n, T(0));
        T m = T(0);
        for (int64_t c = 0; c < C && !std::isnan(m); ++c) {
          const T* row = as_math<S, T>(x + (b * C + c) * HW + j0, n, conv);
          const T r = max_abs(row, n);
          if (std::isnan(r) || r > m) {
            if (m > T(0)) {  // the sum so far was of |f / m|^p; make it of |f / r|^p
              const T shrink = pow_p(m / r, pp);
              for (int64_t j = 0; j < n; ++j) acc[j] *= shrink;
            }
            m = r;
          }
          if (!(m > T(0))) continue;  // all zero so far (or NaN: the sample's map is NaN)
          with_unscale(m, [&](const auto unscale) {
            int64_t j = 0;
            for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) {
              (Vec<T>::loadu(acc + j) + abs_pow(unscale(Vec<T>::loadu(row + j)), pp)).store(acc + j);
            }
            for (; j < n; ++j) acc[j] += pow_p(std::abs(unscale(row[j])), pp);
          });
        }
        task_max[task] = m;
        T* dst = a + b * HW + j0;
        for (int64_t j = 0; j < n; ++j) dst[j] = acc[j] * inv_c;
      }
    });
    // The sample's m is the largest of its tasks' (NaN if any is); each task's sums scale by (m_task / m)^p.
    at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        T mb = T(0);
        for (int64_t k = 0; k < blocks; ++k) {
          const T mk = task_max[b * blocks + k];
          mb = (std::isnan(mk) || mk > mb) ? mk : mb;
        }
        sc[b] = mb == T(0) ? T(1) : mb;
        for (int64_t k = 0; k < blocks; ++k) {
          const T mk = task_max[b * blocks + k];
          if (mk == mb) continue;  // the block was summed on the sample's own m (also m = 0 or inf)
          const T factor = pow_p(mk / mb, pp);  // NaN when mb is
          const int64_t j0 = k * block, n = std::min(block, HW - j0);
          T* dst = a + b * HW + j0;
          for (int64_t j = 0; j < n; ++j) dst[j] *= factor;
        }
      }
    });
  });
  return {out, scale};
}

at::Tensor attention_map_backward_cpu(const at::Tensor& grad_map, const at::Tensor& feature,
                                      const at::Tensor& scale, double p) {
  const at::Tensor m = attention_map_scale(grad_map, feature, scale, p, /*half=*/true);
  const at::Tensor f = feature.contiguous();
  const int64_t B = f.size(0), C = f.size(1), HW = f.size(2) * f.size(3);
  const at::Tensor g = grad_map.to(m.scalar_type()).contiguous();
  at::Tensor out = cpu::empty_prefaulted(f.sizes(), f.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "distillx_attention_map_backward_cpu", [&] {
    using S = scalar_t;
    using T = at::opmath_type<S>;
    constexpr bool same = std::is_same_v<S, T>;
    const S* x = f.const_data_ptr<S>();
    const T* gm = g.const_data_ptr<T>();
    const T* ms = m.const_data_ptr<T>();
    S* dx = out.mutable_data_ptr<S>();
    const T pp = static_cast<T>(p), p_over_c = pp / static_cast<T>(std::max<int64_t>(C, 1));
    // Whole rows per task (at least 32K elements), so each thread streams a contiguous range.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(HW, 1));
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      // Half rows: the row in float, and its gradient in float before it is rounded into dx.
      std::vector<T> conv(same ? 0 : 2 * HW);
      for (int64_t row = begin; row < end; ++row) {
        const T* src = as_math<S, T>(x + row * HW, HW, conv.data());
        const T* grow = gm + (row / C) * HW;
        T* dst = same ? reinterpret_cast<T*>(dx + row * HW) : conv.data() + HW;
        // ∂f = unscale(unscale(f)^(p−1)·g·p/C): the second 1/m last, as the reference's autograd has it,
        // so a subnormal m gives the (large, finite) gradient rather than 0·inf.
        with_unscale(ms[row / C], [&](const auto unscale) {
          int64_t j = 0;
          for (; j + Vec<T>::size() <= HW; j += Vec<T>::size()) {
            const Vec<T> v = unscale(Vec<T>::loadu(src + j)), gv = Vec<T>::loadu(grow + j) * Vec<T>(p_over_c);
            Vec<T> d;
            if (pp == T(2)) {
              d = v;
            } else {
              // |v|^(p−1)·sign(v), with 0 at v = 0 (where the derivative is 0 for p > 1)
              const Vec<T> mag = v.abs().pow(Vec<T>(pp - 1));
              d = Vec<T>::blendv(mag, Vec<T>(0) - mag, v < Vec<T>(0));
              d = Vec<T>::blendv(d, Vec<T>(0), v == Vec<T>(0));
            }
            unscale(d * gv).store(dst + j);
          }
          for (; j < HW; ++j) {
            const T v = unscale(src[j]);
            const T d = pp == T(2) ? v : (v == T(0) ? T(0) : std::copysign(std::pow(std::abs(v), pp - 1), v));
            dst[j] = unscale(d * grow[j] * p_over_c);
          }
        });
        if constexpr (!same) {
          S* out_row = dx + row * HW;
          for (int64_t j = 0; j < HW; ++j) out_row[j] = static_cast<S>(dst[j]);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(distillx, CPU, m) {
  m.impl("attention_map", &attention_map_cpu);
  m.impl("attention_map_backward", &attention_map_backward_cpu);
}

}  // namespace distillx
