// CPU kernels of attention transfer (AT): the channel reduction a[b, hw] = mean_c |f[b, c, hw]|^p of a
// (B, C, H, W) feature map, and its backward ∂a/∂f = (p/C)·|f|^(p−1)·sign(f). Each is one streaming
// pass over the feature map; pooling, normalisation and the loss act on the small (B, H, W) maps.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>

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

at::Tensor attention_map_cpu(const at::Tensor& feature, double p) {
  check_attention_map(feature, p);
  const at::Tensor f = feature.contiguous();
  const int64_t B = f.size(0), C = f.size(1), HW = f.size(2) * f.size(3);
  at::Tensor out = at::empty({B, f.size(2), f.size(3)}, f.options());
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "distillx_attention_map_cpu", [&] {
    using T = scalar_t;
    const T* x = f.const_data_ptr<T>();
    T* a = out.mutable_data_ptr<T>();
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
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      alignas(64) T acc[kMaxBlock];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, j0 = (task % blocks) * block, n = std::min(block, HW - j0);
        std::fill(acc, acc + n, T(0));
        for (int64_t c = 0; c < C; ++c) {
          const T* row = x + (b * C + c) * HW + j0;
          int64_t j = 0;
          for (; j + Vec<T>::size() <= n; j += Vec<T>::size()) {
            (Vec<T>::loadu(acc + j) + abs_pow(Vec<T>::loadu(row + j), pp)).store(acc + j);
          }
          for (; j < n; ++j) acc[j] += pp == T(2) ? row[j] * row[j] : std::pow(std::abs(row[j]), pp);
        }
        T* dst = a + b * HW + j0;
        for (int64_t j = 0; j < n; ++j) dst[j] = acc[j] * inv_c;
      }
    });
  });
  return out;
}

at::Tensor attention_map_backward_cpu(const at::Tensor& grad_map, const at::Tensor& feature, double p) {
  check_attention_map_backward(grad_map, feature, p);
  const at::Tensor f = feature.contiguous();
  const int64_t B = f.size(0), C = f.size(1), HW = f.size(2) * f.size(3);
  const at::Tensor g = grad_map.to(f.scalar_type()).contiguous();
  at::Tensor out = cpu::empty_prefaulted(f.sizes(), f.options());
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "distillx_attention_map_backward_cpu", [&] {
    using T = scalar_t;
    const T* x = f.const_data_ptr<T>();
    const T* gm = g.const_data_ptr<T>();
    T* dx = out.mutable_data_ptr<T>();
    const T pp = static_cast<T>(p), scale = pp / static_cast<T>(std::max<int64_t>(C, 1));
    // Whole rows per task (at least 32K elements), so each thread streams a contiguous range.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(HW, 1));
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const T* src = x + row * HW;
        const T* grow = gm + (row / C) * HW;
        T* dst = dx + row * HW;
        int64_t j = 0;
        for (; j + Vec<T>::size() <= HW; j += Vec<T>::size()) {
          const Vec<T> v = Vec<T>::loadu(src + j), gv = Vec<T>::loadu(grow + j) * Vec<T>(scale);
          Vec<T> d;
          if (pp == T(2)) {
            d = v;
          } else {
            // |v|^(p−1)·sign(v), with 0 at v = 0 (where the derivative is 0 for p > 1)
            const Vec<T> mag = v.abs().pow(Vec<T>(pp - 1));
            d = Vec<T>::blendv(mag, Vec<T>(0) - mag, v < Vec<T>(0));
            d = Vec<T>::blendv(d, Vec<T>(0), v == Vec<T>(0));
          }
          (d * gv).store(dst + j);
        }
        for (; j < HW; ++j) {
          const T v = src[j];
          const T d = pp == T(2) ? v : (v == T(0) ? T(0) : std::copysign(std::pow(std::abs(v), pp - 1), v));
          dst[j] = d * grow[j] * scale;
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
