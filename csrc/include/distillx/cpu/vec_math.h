// Vector math shared by the CPU kernels.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace distillx {
namespace cpu {

// exp at the accuracy float32 accumulation needs: float uses Sleef's ~20-ulp variant (about twice
// as fast as the 1-ulp one, and 20 ulp is ~2e-6 relative, far below what float32 sums over a row
// keep), double the accurate one.
template <typename Vec>
inline Vec fast_exp(const Vec& v) {
  if constexpr (std::is_same_v<typename Vec::value_type, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

// Horizontal sum of a vector's lanes, in its element type, through memory (works for every
// Vectorized<T> specialisation).
template <typename Vec>
inline typename Vec::value_type hsum(const Vec& v) {
  typename Vec::value_type lanes[Vec::size()];
  v.store(lanes);
  typename Vec::value_type acc = 0;
  for (int k = 0; k < Vec::size(); ++k) acc += lanes[k];
  return acc;
}

}  // namespace cpu
}  // namespace distillx
