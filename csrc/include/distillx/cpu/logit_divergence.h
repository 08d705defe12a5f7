// One row of the logit divergence on the CPU: statistics, loss and gradient in two sweeps over a
// row held in a per-thread scratch buffer (so memory traffic is one read of each input and one write
// of the gradient). Vectorised with at::vec; accumulation in float (double for double inputs).
//
//   p = softmax(t/T), q = softmax(s/T), lp = log p, lq = log q
//   forward KL  T²·Σ p(lp−lq)                      ∂/∂s = T·(q − p)
//   reverse KL  T²·Σ q(lq−lp)                      ∂/∂s = T·q·(lq − lp − KL(q‖p))
//   JSD_β       T²·[β Σ p(lp−lm) + (1−β) Σ q(lq−lm)], m = βp+(1−β)q
//                                                  ∂/∂s = T·(1−β)·q·(lq − lm − KL(q‖m))
// Terms whose probability is 0 are 0 (0·log 0 = 0), so −inf logits are allowed wherever the other
// side's probability is 0 as well. A row whose student or teacher logits are all −inf has no
// distribution and contributes 0 (loss and gradient).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "distillx/cpu/vec_math.h"
#include "distillx/logit_divergence.h"

namespace distillx {
namespace cpu {

template <typename acc_t>
struct DivergenceParams {
  int64_t divergence;
  acc_t inv_temperature;  // 1/T
  acc_t temperature;      // T
  acc_t beta;
};

// Scratch layout per thread: four rows of `padded` elements (a, b, ea, eb), padded to a whole
// number of vectors with −inf so every sweep runs on full vectors and padding contributes 0.
template <typename acc_t>
inline int64_t padded_cols(int64_t C) {
  constexpr int64_t V = at::vec::Vectorized<acc_t>::size();
  return (C + V - 1) / V * V;
}

// Horizontal maximum through memory (hsum is in vec_math.h); NaN wins.
template <typename Vec>
inline typename Vec::value_type hmax(const Vec& v) {
  typename Vec::value_type lanes[Vec::size()];
  v.store(lanes);
  typename Vec::value_type acc = lanes[0];
  for (int k = 1; k < Vec::size(); ++k) acc = (lanes[k] > acc || std::isnan(lanes[k])) ? lanes[k] : acc;
  return acc;
}

// dst = src·scale, padded with −inf; returns its maximum (NaN if any element is NaN). A float row
// is scaled and reduced in the same sweep; other dtypes are converted first.
template <typename scalar_t, typename acc_t>
inline acc_t load_scaled(const scalar_t* src, acc_t* dst, int64_t C, int64_t padded, acc_t scale) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  Vec vmax(ninf);
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const Vec vs(scale);
    for (; j + V <= C; j += V) {
      const Vec v = Vec::loadu(src + j) * vs;
      v.store(dst + j);
      vmax = at::vec::maximum(vmax, v);
    }
  }
  for (int64_t k = j; k < C; ++k) dst[k] = static_cast<acc_t>(src[k]) * scale;
  for (int64_t k = C; k < padded; ++k) dst[k] = ninf;
  for (; j < padded; j += V) vmax = at::vec::maximum(vmax, Vec::loadu(dst + j));
  return hmax(vmax);
}

// e = exp(x − m); returns Σ e.
template <typename acc_t>
inline acc_t exp_sum(const acc_t* x, acc_t* e, int64_t padded, acc_t m) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vm(m);
  Vec acc(0);
  for (int64_t j = 0; j < padded; j += Vec::size()) {
    const Vec v = fast_exp(Vec::loadu(x + j) - vm);
    v.store(e + j);
    acc = acc + v;
  }
  return hsum(acc);
}

// w·(a − b) where w == 0 gives exactly 0 (0·log 0 = 0, and −inf logits are allowed); NaN in w
// still propagates, so a non-finite logit in a kept row is never silently dropped.
template <typename Vec>
inline Vec guarded(const Vec& w, const Vec& a, const Vec& b) {
  return Vec::blendv(w * (a - b), Vec(0), w == Vec(0));
}

// log(βp + (1−β)q) from the log-probabilities, as a log-sum-exp so that a denormal p or q whose
// mixture rounds to 0 still gives a finite log (lb = log β, lb1 = log(1−β)).
template <typename Vec>
inline Vec log_mixture(const Vec& lp, const Vec& lq, const Vec& lb, const Vec& lb1) {
  const Vec x = lb + lp, y = lb1 + lq;
  const Vec m = at::vec::maximum(x, y);
  return m + ((x - m).exp() + (y - m).exp()).log();
}

// Computes one row. `grad` may alias `s_row` (the row is read into scratch before it is written).
// Returns the weighted row loss w·T²·D; writes w·∂(T²·D)/∂s into grad when grad != nullptr.
template <typename scalar_t, typename acc_t>
inline acc_t divergence_row(const scalar_t* s_row, const scalar_t* t_row, scalar_t* grad, int64_t C,
                            acc_t weight, const DivergenceParams<acc_t>& prm, acc_t* scratch) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t P = padded_cols<acc_t>(C);
  auto zero_grad = [&] {
    if (grad != nullptr) std::fill(grad, grad + C, static_cast<scalar_t>(0));
  };
  if (weight == acc_t(0)) {  // dropped row: never read its values (they may be garbage or NaN)
    zero_grad();
    return acc_t(0);
  }
  acc_t* a = scratch;
  acc_t* b = scratch + P;
  acc_t* ea = scratch + 2 * P;
  acc_t* eb = scratch + 3 * P;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const acc_t ms = load_scaled(s_row, a, C, P, prm.inv_temperature);
  const acc_t mt = load_scaled(t_row, b, C, P, prm.inv_temperature);
  if (ms == ninf || mt == ninf) {
    zero_grad();
    return acc_t(0);
  }
  const acc_t zs = exp_sum(a, ea, P, ms);
  const acc_t zt = exp_sum(b, eb, P, mt);
  const Vec lse_s(ms + std::log(zs)), lse_t(mt + std::log(zt));
  const Vec rzs(acc_t(1) / zs), rzt(acc_t(1) / zt);
  const acc_t T = prm.temperature;
  const acc_t beta = prm.beta;
  // ∂/∂s carries T²·(1/T) = T from the chain rule through s/T.
  const Vec gscale(weight * T);

  acc_t total;  // T²-free divergence of the row
  if (prm.divergence == kForwardKL) {
    // The forward-KL gradient needs no row total: it is stored in the same sweep, straight into
    // grad for float rows (s_row, which grad may alias, is already in scratch).
    constexpr bool direct = std::is_same_v<scalar_t, acc_t>;
    constexpr int64_t V = Vec::size();
    Vec loss(0);
    for (int64_t j = 0; j < P; j += V) {
      const Vec p = Vec::loadu(eb + j) * rzt, q = Vec::loadu(ea + j) * rzs;
      const Vec lp = Vec::loadu(b + j) - lse_t, lq = Vec::loadu(a + j) - lse_s;
      loss = loss + guarded(p, lp, lq);
      if (grad == nullptr) continue;
      const Vec gj = (q - p) * gscale;
      if constexpr (direct) {
        gj.store(reinterpret_cast<acc_t*>(grad) + j, std::min<int64_t>(V, C - j));
      } else {
        gj.store(ea + j);
      }
    }
    total = hsum(loss);
    if constexpr (direct) return weight * T * T * total;
  } else {
    // ref = lp (reverse KL) or lm = log(βp+(1−β)q) (JSD). The gradient needs the row total
    // KL(q‖ref) first, so r = lq − ref and q are kept in scratch for a second, in-cache sweep.
    const bool jsd = prm.divergence == kJSD;
    const bool p_term = jsd && beta != acc_t(0);
    const bool q_term = !jsd || beta != acc_t(1);  // β = 1 leaves no q-side term (and m may be 0)
    const Vec lb(std::log(beta)), lb1(std::log1p(-beta));
    Vec ploss(0), qloss(0);
    for (int64_t j = 0; j < P; j += Vec::size()) {
      const Vec p = Vec::loadu(eb + j) * rzt, q = Vec::loadu(ea + j) * rzs;
      const Vec lp = Vec::loadu(b + j) - lse_t, lq = Vec::loadu(a + j) - lse_s;
      const Vec ref = jsd ? log_mixture(lp, lq, lb, lb1) : lp;
      if (p_term) ploss = ploss + guarded(p, lp, ref);
      if (q_term) qloss = qloss + guarded(q, lq, ref);
      (lq - ref).store(a + j);
      q.store(ea + j);
    }
    const acc_t inner = q_term ? hsum(qloss) : acc_t(0);
    const acc_t qcoef = jsd ? acc_t(1) - beta : acc_t(1);
    total = qcoef * inner + (p_term ? beta * hsum(ploss) : acc_t(0));
    if (grad != nullptr && !q_term) {
      std::fill(ea, ea + P, acc_t(0));  // β = 1: the loss does not depend on q
    } else if (grad != nullptr) {
      const Vec vinner(inner), gq = gscale * Vec(qcoef);
      for (int64_t j = 0; j < P; j += Vec::size()) {
        (guarded(Vec::loadu(ea + j), Vec::loadu(a + j), vinner) * gq).store(ea + j);
      }
    }
  }
  if (grad != nullptr) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      std::copy(ea, ea + C, grad);
    } else {
      for (int64_t j = 0; j < C; ++j) grad[j] = static_cast<scalar_t>(ea[j]);
    }
  }
  return weight * T * T * total;
}

}  // namespace cpu
}  // namespace distillx
