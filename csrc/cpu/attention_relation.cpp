// CPU kernels of the MiniLM attention-relation loss (distillx::attention_relation and its backward):
//   L = Σ_{b,a,i valid} KL(p_i ‖ q_i) / #valid rows,  p_i = softmax(z_t,i), q_i = softmax(z_s,i),
//   z_s = q_s k_sᵀ/√ds, z_t = q_t k_tᵀ/√dt (keys of padded tokens excluded).
// Flash-attention style: per (b, a), query rows in blocks of Bq meet key blocks of Bk, so a thread
// holds two (Bq, Bk) score tiles and never (L, L).
//  * forward, one pass over the key blocks: online softmax statistics of both sides (running max
//    m and l = Σ e^(z−m)) and A = Σ_j e^(z_t,j − m_t)((z_t,j − m_t) − (z_s,j − m_s)), rescaled whenever
//    a maximum grows; then KL_i = A/l_t − log l_t + log l_s. Saves lse_s, lse_t per row (B, A, L, 2).
//  * backward recomputes the tiles: ∂L/∂z_s,ij = g·(q_ij − p_ij)/#valid, ∂q_s = ∂Z k_s/√ds,
//    ∂k_s = ∂Zᵀ q_s/√ds.
// Padded tokens are dropped up front (their rows gathered out), so the inner loops carry no mask.
// distillx::attention_relation_fused (CPU only) is the training path for sequences whose score rows
// fit: loss and gradient in one pass, each query block's full score rows held (no recomputation).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>
#include <limits>
#include <utility>
#include <vector>

#include "distillx/checks.h"
#include "distillx/attention_relation.h"
#include "distillx/cpu/vec_math.h"

namespace distillx {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

constexpr int64_t kQueryBlock = 128, kKeyBlock = 512;

// The real tokens of each batch element (all of them without a mask) and the number of valid rows.
struct Tokens {
  std::vector<at::Tensor> index;  // per b: int64 positions of real tokens, undefined = all L
  std::vector<int64_t> count;     // per b
  int64_t rows = 0;               // Σ_b count[b] · A
};

Tokens real_tokens(const at::Tensor& mask, int64_t B, int64_t A, int64_t L) {
  Tokens tok;
  tok.index.resize(B);
  tok.count.assign(B, L);
  for (int64_t b = 0; b < B; ++b) {
    if (mask.defined()) {
      tok.index[b] = at::nonzero(mask[b]).squeeze(1);
      tok.count[b] = tok.index[b].size(0);
    }
    tok.rows += tok.count[b] * A;
  }
  return tok;
}

// Rows of x (L, d) at the real tokens: a view when there is no mask, a compact copy otherwise.
inline at::Tensor gather(const at::Tensor& x, const at::Tensor& index) {
  return index.defined() ? x.index_select(0, index) : x;
}

// One (b, a) head's inputs at its real tokens.
struct Head {
  at::Tensor idx, q_s, k_s, q_t, k_t;
  Head(const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt, const at::Tensor& kt, const Tokens& tok,
       int64_t b, int64_t a)
      : idx(tok.index[b]), q_s(gather(qs[b][a], idx)), k_s(gather(ks[b][a], idx)), q_t(gather(qt[b][a], idx)),
        k_t(gather(kt[b][a], idx)) {}
};

// A head's gradient buffers: without padding the outputs' own rows (written in place); with it,
// compact copies that scatter() puts into the outputs at the real tokens.
struct HeadGrads {
  at::Tensor dq, dk;
  HeadGrads(const Head& h, const at::Tensor& gq, const at::Tensor& gk, int64_t b, int64_t a)
      : dq(h.idx.defined() ? at::zeros_like(h.q_s) : gq[b][a]), dk(h.idx.defined() ? at::zeros_like(h.k_s) : gk[b][a]) {}
  void scatter(const Head& h, const at::Tensor& gq, const at::Tensor& gk, int64_t b, int64_t a) const {
    if (!h.idx.defined()) return;
    gq[b][a].index_copy_(0, h.idx, dq);
    gk[b][a].index_copy_(0, h.idx, dk);
  }
};

template <typename T>
inline T hmax(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return at::vec::maximum(a, b); }, v);
}

// The maxima of two rows of n scores (−inf for n = 0).
template <typename T>
std::pair<T, T> row_maxima(const T* zs, const T* zt, int64_t n) {
  constexpr int64_t V = Vec<T>::size();
  const T inf = std::numeric_limits<T>::infinity();
  Vec<T> vs(-inf), vt(-inf);
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    vs = at::vec::maximum(vs, Vec<T>::loadu(zs + j));
    vt = at::vec::maximum(vt, Vec<T>::loadu(zt + j));
  }
  T bs = hmax(vs), bt = hmax(vt);
  for (int64_t r = j; r < n; ++r) bs = std::max(bs, zs[r]), bt = std::max(bt, zt[r]);
  return {bs, bt};
}

// Online softmax state of one query row. acc = Σ_j e^(z_t,j − m_t)((z_t,j − m_t) − (z_s,j − m_s)), so
// KL = acc/l_t − log l_t + log l_s carries no m terms that would cancel (a single key gives exactly 0).
template <typename T>
struct RowState {
  T ms = -std::numeric_limits<T>::infinity(), ls = 0;
  T mt = -std::numeric_limits<T>::infinity(), lt = 0, acc = 0;

  // Fold in one key block of scaled scores zs, zt (n values each): two sweeps, two exps per key.
  void update(const T* zs, const T* zt, int64_t n) {
    constexpr int64_t V = Vec<T>::size();
    const auto [bs, bt] = row_maxima(zs, zt, n);
    const T ms_new = std::max(ms, bs), mt_new = std::max(mt, bt);
    Vec<T> sum_s(0), sum_t(0), sum_a(0);
    const Vec<T> ms_v(ms_new), mt_v(mt_new);
    int64_t j = 0;
    for (; j + V <= n; j += V) {
      const Vec<T> s = Vec<T>::loadu(zs + j) - ms_v, t = Vec<T>::loadu(zt + j) - mt_v;
      const Vec<T> et = cpu::fast_exp(t);
      sum_s = sum_s + cpu::fast_exp(s);
      sum_t = sum_t + et;
      sum_a = sum_a + et * (t - s);
    }
    T es = cpu::hsum(sum_s), et = cpu::hsum(sum_t), ea = cpu::hsum(sum_a);
    for (int64_t r = j; r < n; ++r) {
      const T s = zs[r] - ms_new, t = zt[r] - mt_new, e = std::exp(t);
      es += std::exp(s), et += e, ea += e * (t - s);
    }
    if (lt > 0) {
      // Earlier keys: their exp factors shrink by e^(m_t − m_t'), their brackets shift by
      // (m_s' − m_s) − (m_t' − m_t).
      const T rescale = std::exp(mt - mt_new);
      acc = rescale * (acc + ((ms_new - ms) - (mt_new - mt)) * lt);
      lt *= rescale;
      ls *= std::exp(ms - ms_new);
    }
    ls += es, lt += et, acc += ea;
    ms = ms_new, mt = mt_new;
  }
  T lse_s() const { return ms + std::log(ls); }
  T lse_t() const { return mt + std::log(lt); }
  T kl() const { return acc / lt - std::log(lt) + std::log(ls); }
};

// One (Bq, Bk) tile of both sides' scaled scores.
template <typename T>
struct Tiles {
  at::Tensor zs, zt;
  Tiles(int64_t bq, int64_t bk, const at::TensorOptions& o) : zs(at::empty({bq, bk}, o)), zt(at::empty({bq, bk}, o)) {}
  void compute(const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt, const at::Tensor& kt, int64_t i0,
               int64_t n, int64_t j0, int64_t nk, T ss, T st, at::Tensor& s_out, at::Tensor& t_out) {
    s_out = zs.narrow(0, 0, n).narrow(1, 0, nk);
    t_out = zt.narrow(0, 0, n).narrow(1, 0, nk);
    // β = 0: the tile's old contents are ignored; α applies the 1/√d scale inside the GEMM.
    at::addmm_out(s_out, s_out, qs.narrow(0, i0, n), ks.narrow(0, j0, nk).t(), 0, ss);
    at::addmm_out(t_out, t_out, qt.narrow(0, i0, n), kt.narrow(0, j0, nk).t(), 0, st);
  }
};

template <typename T>
double relation_forward_typed(const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt, const at::Tensor& kt,
                              const Tokens& tok, const at::Tensor& stats) {
  const int64_t B = qs.size(0), A = qs.size(1);
  const T ss = T(1) / std::sqrt(static_cast<T>(qs.size(3))), st = T(1) / std::sqrt(static_cast<T>(qt.size(3)));
  std::vector<double> partial(B * A, 0.0);
  at::parallel_for(0, B * A, 1, [&](int64_t begin, int64_t end) {
    Tiles<T> tiles(kQueryBlock, kKeyBlock, qs.options());
    std::vector<RowState<T>> state(kQueryBlock);
    for (int64_t ba = begin; ba < end; ++ba) {
      const int64_t b = ba / A, a = ba % A, n_tok = tok.count[b];
      const Head h(qs, ks, qt, kt, tok, b, a);
      at::Tensor lse = at::empty({n_tok, 2}, qs.options());
      T* lse_p = lse.data_ptr<T>();
      double kl = 0;
      for (int64_t i0 = 0; i0 < n_tok; i0 += kQueryBlock) {
        const int64_t n = std::min(kQueryBlock, n_tok - i0);
        std::fill(state.begin(), state.begin() + n, RowState<T>{});
        for (int64_t j0 = 0; j0 < n_tok; j0 += kKeyBlock) {
          const int64_t nk = std::min(kKeyBlock, n_tok - j0);
          at::Tensor zs, zt;
          tiles.compute(h.q_s, h.k_s, h.q_t, h.k_t, i0, n, j0, nk, ss, st, zs, zt);
          const T* ps = zs.const_data_ptr<T>();
          const T* pt = zt.const_data_ptr<T>();
          const int64_t stride = zs.stride(0);
          for (int64_t r = 0; r < n; ++r) state[r].update(ps + r * stride, pt + r * stride, nk);
        }
        for (int64_t r = 0; r < n; ++r) {
          kl += state[r].kl();
          lse_p[2 * (i0 + r)] = state[r].lse_s();
          lse_p[2 * (i0 + r) + 1] = state[r].lse_t();
        }
      }
      at::Tensor out = stats[b][a];
      if (h.idx.defined()) out.index_copy_(0, h.idx, lse); else out.copy_(lse);
      partial[ba] = kl;
    }
  });
  double total = 0;
  for (double v : partial) total += v;
  return total;
}

template <typename T>
void relation_backward_typed(T scale, const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt,
                             const at::Tensor& kt, const Tokens& tok, const at::Tensor& stats, const at::Tensor& gq,
                             const at::Tensor& gk) {
  const int64_t B = qs.size(0), A = qs.size(1);
  const T ss = T(1) / std::sqrt(static_cast<T>(qs.size(3))), st = T(1) / std::sqrt(static_cast<T>(qt.size(3)));
  at::parallel_for(0, B * A, 1, [&](int64_t begin, int64_t end) {
    Tiles<T> tiles(kQueryBlock, kKeyBlock, qs.options());
    for (int64_t ba = begin; ba < end; ++ba) {
      const int64_t b = ba / A, a = ba % A, n_tok = tok.count[b];
      const Head h(qs, ks, qt, kt, tok, b, a);
      const at::Tensor lse = gather(stats[b][a], h.idx).contiguous();
      const T* lse_p = lse.const_data_ptr<T>();
      HeadGrads g(h, gq, gk, b, a);
      for (int64_t i0 = 0; i0 < n_tok; i0 += kQueryBlock) {
        const int64_t n = std::min(kQueryBlock, n_tok - i0);
        for (int64_t j0 = 0; j0 < n_tok; j0 += kKeyBlock) {
          const int64_t nk = std::min(kKeyBlock, n_tok - j0);
          at::Tensor zs, zt;
          tiles.compute(h.q_s, h.k_s, h.q_t, h.k_t, i0, n, j0, nk, ss, st, zs, zt);
          T* ps = zs.data_ptr<T>();
          const T* pt = zt.const_data_ptr<T>();
          const int64_t stride = zs.stride(0);
          for (int64_t r = 0; r < n; ++r) {
            const T ls = lse_p[2 * (i0 + r)], lt = lse_p[2 * (i0 + r) + 1];
            // ∂Z overwrites the student tile: scale·(e^(z_s − lse_s) − e^(z_t − lse_t)).
            at::vec::map2<T>([ls, lt, scale](const Vec<T>& s, const Vec<T>& t) {
              return (cpu::fast_exp(s - Vec<T>(ls)) - cpu::fast_exp(t - Vec<T>(lt))) * Vec<T>(scale);
            }, ps + r * stride, ps + r * stride, pt + r * stride, nk);
          }
          g.dq.narrow(0, i0, n).addmm_(zs, h.k_s.narrow(0, j0, nk), 1, ss);
          g.dk.narrow(0, j0, nk).addmm_(zs.t(), h.q_s.narrow(0, i0, n), 1, ss);
        }
      }
      g.scatter(h, gq, gk, b, a);
    }
  });
}

// One query row against all n keys of the fused pass: KL(p ‖ q) of the row and, when grad, its
// gradient with respect to the student's scaled scores, (q − p)·w, written over zs. Three sweeps over
// the row (maxima; exps and sums; gradient), each in cache; two exps per key.
template <typename T>
T fused_row(T* zs, T* zt, int64_t n, bool grad, T w) {
  constexpr int64_t V = Vec<T>::size();
  const auto [ms, mt] = row_maxima(zs, zt, n);
  const Vec<T> ms_v(ms), mt_v(mt);
  Vec<T> sum_s(0), sum_t(0), sum_a(0);
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    const Vec<T> s = Vec<T>::loadu(zs + j) - ms_v, t = Vec<T>::loadu(zt + j) - mt_v;
    const Vec<T> es = cpu::fast_exp(s), et = cpu::fast_exp(t);
    sum_s = sum_s + es;
    sum_t = sum_t + et;
    sum_a = sum_a + et * (t - s);
    if (grad) es.store(zs + j), et.store(zt + j);
  }
  T ls = cpu::hsum(sum_s), lt = cpu::hsum(sum_t), acc = cpu::hsum(sum_a);
  for (int64_t r = j; r < n; ++r) {
    const T s = zs[r] - ms, t = zt[r] - mt, es = std::exp(s), et = std::exp(t);
    ls += es, lt += et, acc += et * (t - s);
    if (grad) zs[r] = es, zt[r] = et;
  }
  if (grad) {
    const T a = w / ls, b = w / lt;
    at::vec::map2<T>([a, b](const Vec<T>& es, const Vec<T>& et) { return es * Vec<T>(a) - et * Vec<T>(b); }, zs, zs,
                     zt, n);
  }
  return acc / lt - std::log(lt) + std::log(ls);
}

// Rows of a query block in the fused pass: its scores against every key are held, rows × L per side,
// within about 1 MB per side (and at least 16 rows).
inline int64_t fused_rows(int64_t L) {
  return std::max<int64_t>(16, std::min<int64_t>(kQueryBlock, (int64_t{1} << 18) / std::max<int64_t>(L, 1)));
}

// The fused pass: the loss and (grad) its gradient for q_s, k_s at unit upstream gradient, already
// divided by the number of valid rows. A query block's score rows are complete before its softmax, so
// no online rescaling and no recomputation in a backward.
template <typename T>
double relation_fused_typed(const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt, const at::Tensor& kt,
                            const Tokens& tok, const at::Tensor& gq, const at::Tensor& gk) {
  const int64_t B = qs.size(0), A = qs.size(1), L = qs.size(2);
  const bool grad = gq.defined();
  const T ss = T(1) / std::sqrt(static_cast<T>(qs.size(3))), st = T(1) / std::sqrt(static_cast<T>(qt.size(3)));
  const T w = T(1) / static_cast<T>(tok.rows);
  const int64_t R = fused_rows(L);
  std::vector<double> partial(B * A, 0.0);
  at::parallel_for(0, B * A, 1, [&](int64_t begin, int64_t end) {
    at::Tensor zs_buf = at::empty({R, L}, qs.options()), zt_buf = at::empty({R, L}, qs.options());
    for (int64_t ba = begin; ba < end; ++ba) {
      const int64_t b = ba / A, a = ba % A, n_tok = tok.count[b];
      if (n_tok == 0) continue;
      const Head h(qs, ks, qt, kt, tok, b, a);
      const std::optional<HeadGrads> g = grad ? std::optional<HeadGrads>(std::in_place, h, gq, gk, b, a) : std::nullopt;
      double kl = 0;
      for (int64_t i0 = 0; i0 < n_tok; i0 += R) {
        const int64_t n = std::min(R, n_tok - i0);
        at::Tensor zs = zs_buf.narrow(0, 0, n).narrow(1, 0, n_tok), zt = zt_buf.narrow(0, 0, n).narrow(1, 0, n_tok);
        // β = 0: the buffers' old contents are ignored; α applies the 1/√d scale inside the GEMM.
        at::addmm_out(zs, zs, h.q_s.narrow(0, i0, n), h.k_s.t(), 0, ss);
        at::addmm_out(zt, zt, h.q_t.narrow(0, i0, n), h.k_t.t(), 0, st);
        T* ps = zs.data_ptr<T>();
        T* pt = zt.data_ptr<T>();
        const int64_t stride = zs.stride(0);
        for (int64_t r = 0; r < n; ++r) kl += fused_row<T>(ps + r * stride, pt + r * stride, n_tok, grad, w);
        if (g) {
          g->dq.narrow(0, i0, n).addmm_(zs, h.k_s, 1, ss);
          g->dk.addmm_(zs.t(), h.q_s.narrow(0, i0, n), 1, ss);
        }
      }
      if (g) g->scatter(h, gq, gk, b, a);
      partial[ba] = kl;
    }
  });
  double total = 0;
  for (double v : partial) total += v;
  return total;
}

// Detached and contiguous: the GEMMs run on worker threads, which do not inherit the caller's
// below-autograd dispatch state.
inline at::Tensor plain(const at::Tensor& x) { return x.detach().contiguous(); }

Tokens tokens_of(const at::Tensor& q_s, const std::optional<at::Tensor>& key_padding_mask) {
  const at::Tensor mask = key_padding_mask ? key_padding_mask->contiguous() : at::Tensor();
  return real_tokens(mask, q_s.size(0), q_s.size(1), q_s.size(2));
}

std::tuple<at::Tensor, at::Tensor> attention_relation_cpu(const at::Tensor& q_s, const at::Tensor& k_s,
                                                          const at::Tensor& q_t, const at::Tensor& k_t,
                                                          const std::optional<at::Tensor>& key_padding_mask) {
  check_relation_inputs(q_s, k_s, q_t, k_t, key_padding_mask);
  const Tokens tok = tokens_of(q_s, key_padding_mask);
  at::Tensor stats = at::zeros({q_s.size(0), q_s.size(1), q_s.size(2), 2}, q_s.options());
  double total = 0;
  if (tok.rows > 0) {
    total = q_s.scalar_type() == at::kDouble
                ? relation_forward_typed<double>(plain(q_s), plain(k_s), plain(q_t), plain(k_t), tok, stats)
                : relation_forward_typed<float>(plain(q_s), plain(k_s), plain(q_t), plain(k_t), tok, stats);
    total /= static_cast<double>(tok.rows);
  }
  return {at::scalar_tensor(total, q_s.options()), stats};
}

std::tuple<at::Tensor, at::Tensor> attention_relation_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& stats) {
  check_relation_inputs(q_s, k_s, q_t, k_t, key_padding_mask);
  check_relation_stats(stats, q_s, grad);
  const Tokens tok = tokens_of(q_s, key_padding_mask);
  at::Tensor gq = at::zeros_like(q_s, at::MemoryFormat::Contiguous);
  at::Tensor gk = at::zeros_like(k_s, at::MemoryFormat::Contiguous);
  if (tok.rows == 0) return {gq, gk};
  const double scale = grad.item<double>() / static_cast<double>(tok.rows);
  if (q_s.scalar_type() == at::kDouble) {
    relation_backward_typed<double>(scale, plain(q_s), plain(k_s), plain(q_t), plain(k_t), tok, plain(stats), gq, gk);
  } else {
    relation_backward_typed<float>(static_cast<float>(scale), plain(q_s), plain(k_s), plain(q_t), plain(k_t), tok,
                                   plain(stats), gq, gk);
  }
  return {gq, gk};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_relation_fused_cpu(
    const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
    const std::optional<at::Tensor>& key_padding_mask, bool compute_grad) {
  check_relation_inputs(q_s, k_s, q_t, k_t, key_padding_mask);
  const Tokens tok = tokens_of(q_s, key_padding_mask);
  at::Tensor gq = compute_grad ? at::zeros_like(q_s, at::MemoryFormat::Contiguous) : at::empty({0}, q_s.options());
  at::Tensor gk = compute_grad ? at::zeros_like(k_s, at::MemoryFormat::Contiguous) : at::empty({0}, k_s.options());
  double total = 0;
  if (tok.rows > 0) {
    const at::Tensor g_q = compute_grad ? gq : at::Tensor(), g_k = compute_grad ? gk : at::Tensor();
    total = q_s.scalar_type() == at::kDouble
                ? relation_fused_typed<double>(plain(q_s), plain(k_s), plain(q_t), plain(k_t), tok, g_q, g_k)
                : relation_fused_typed<float>(plain(q_s), plain(k_s), plain(q_t), plain(k_t), tok, g_q, g_k);
    total /= static_cast<double>(tok.rows);
  }
  return {at::scalar_tensor(total, q_s.options()), gq, gk};
}

}  // namespace

TORCH_LIBRARY_IMPL(distillx, CPU, m) {
  m.impl("attention_relation", &attention_relation_cpu);
  m.impl("attention_relation_backward", &attention_relation_backward_cpu);
  m.impl("attention_relation_fused", &attention_relation_fused_cpu);
}

}  // namespace distillx
