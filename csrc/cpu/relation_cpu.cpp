// CPU kernel of the MiniLM attention-relation loss (distillx::attention_relation):
//   L = Σ_{b,a,i valid} KL(softmax(q_t,i k_tᵀ/√dt) ‖ softmax(q_s,i k_sᵀ/√ds)) / #valid rows.
// Per (b, a), query rows are taken in blocks of Bq: the (Bq, L) score blocks of both sides come from
// two GEMMs, each row's KL and ∂/∂scores = (q − p)/#valid come from the logit-divergence row kernel
// (forward KL, T = 1), and two more GEMMs fold that into ∂q_s and ∂k_s. Memory is O(Bq·L) per
// thread, never (L, L); the gradient is produced in the same pass (the loss is a scalar).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "distillx/checks.h"
#include "distillx/divergence_row_cpu.h"

namespace distillx {
namespace {

template <typename T>
void relation_cpu_typed(const at::Tensor& qs, const at::Tensor& ks, const at::Tensor& qt, const at::Tensor& kt,
                        const at::Tensor& mask, const at::Tensor& gq, const at::Tensor& gk, double& total,
                        int64_t& count, bool grad) {
  const int64_t B = qs.size(0), A = qs.size(1), L = qs.size(2), ds = qs.size(3), dt = qt.size(3);
  const bool* m = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  // Valid query rows (real tokens) over the whole batch and every head.
  count = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t valid = L;
    if (m) {
      valid = 0;
      for (int64_t i = 0; i < L; ++i) valid += m[b * L + i];
    }
    count += valid * A;
  }
  if (count == 0 || L == 0) {
    total = 0;
    return;
  }
  const T inv = T(1) / static_cast<T>(count);
  const T ss = T(1) / std::sqrt(static_cast<T>(ds)), st = T(1) / std::sqrt(static_cast<T>(dt));
  const int64_t bq = std::max<int64_t>(16, std::min<int64_t>(256, (int64_t{1} << 17) / std::max<int64_t>(L, 1)));
  std::vector<double> partial(B * A, 0.0);
  const auto opts = qs.options();
  at::parallel_for(0, B * A, 1, [&](int64_t begin, int64_t end) {
    at::Tensor zs_buf = at::empty({bq, L}, opts), zt_buf = at::empty({bq, L}, opts);
    std::vector<T> scratch(4 * cpu::padded_cols<T>(L));
    const cpu::DivergenceParams<T> prm{kForwardKL, T(1), T(1), T(0)};
    for (int64_t ba = begin; ba < end; ++ba) {
      const int64_t b = ba / A, a = ba % A;
      const at::Tensor q_s = qs[b][a], k_s = ks[b][a], q_t = qt[b][a], k_t = kt[b][a];
      double acc = 0;
      for (int64_t i0 = 0; i0 < L; i0 += bq) {
        const int64_t n = std::min(bq, L - i0);
        at::Tensor zs = zs_buf.narrow(0, 0, n), zt = zt_buf.narrow(0, 0, n);
        at::mm_out(zs, q_s.narrow(0, i0, n), k_s.t());
        at::mm_out(zt, q_t.narrow(0, i0, n), k_t.t());
        T* ps = zs.data_ptr<T>();
        T* pt = zt.data_ptr<T>();
        for (int64_t r = 0; r < n; ++r) {
          T* rs = ps + r * L;
          T* rt = pt + r * L;
          const bool valid_row = m == nullptr || m[b * L + i0 + r];
          for (int64_t j = 0; j < L; ++j) {
            const bool key = m == nullptr || m[b * L + j];
            rs[j] = key ? rs[j] * ss : -std::numeric_limits<T>::infinity();
            rt[j] = key ? rt[j] * st : -std::numeric_limits<T>::infinity();
          }
          // ∂/∂z_s (= (q − p)/count) overwrites the student scores in place.
          acc += cpu::divergence_row<T, T>(rs, rt, grad ? rs : nullptr, L, valid_row ? inv : T(0), prm,
                                           scratch.data());
        }
        if (!grad) continue;
        // z_s = q_s k_sᵀ/√ds: ∂q_s = G k_s/√ds, ∂k_s += Gᵀ q_s/√ds.
        at::Tensor gq_blk = gq[b][a].narrow(0, i0, n);
        at::mm_out(gq_blk, zs, k_s);
        gq_blk.mul_(ss);
        gk[b][a].addmm_(zs.t(), q_s.narrow(0, i0, n), 1, ss);
      }
      partial[ba] = acc;
    }
  });
  total = 0;
  for (double v : partial) total += v;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_relation_cpu(const at::Tensor& q_s, const at::Tensor& k_s,
                                                                      const at::Tensor& q_t, const at::Tensor& k_t,
                                                                      const std::optional<at::Tensor>& key_padding_mask,
                                                                      bool compute_grad) {
  for (const auto* x : {&q_s, &k_s, &q_t, &k_t}) {
    TORCH_CHECK(x->dim() == 4, "distillx: attention_relation expects (B, A, L, d) inputs, got ", x->sizes());
    TORCH_CHECK(x->scalar_type() == q_s.scalar_type() &&
                    (q_s.scalar_type() == at::kFloat || q_s.scalar_type() == at::kDouble),
                "distillx: attention_relation expects float32 or float64 inputs of one dtype");
    check_same_device(*x, q_s, "every input", "q_s");
  }
  TORCH_CHECK(k_s.sizes() == q_s.sizes(), "distillx: k_s must match q_s, got ", k_s.sizes(), " and ", q_s.sizes());
  TORCH_CHECK(k_t.sizes() == q_t.sizes(), "distillx: k_t must match q_t, got ", k_t.sizes(), " and ", q_t.sizes());
  TORCH_CHECK(q_t.size(0) == q_s.size(0) && q_t.size(1) == q_s.size(1) && q_t.size(2) == q_s.size(2),
              "distillx: q_t (B, A, L) must match q_s's, got ", q_t.sizes(), " and ", q_s.sizes());
  at::Tensor mask;
  if (key_padding_mask) {
    TORCH_CHECK(key_padding_mask->scalar_type() == at::kBool && key_padding_mask->dim() == 2 &&
                    key_padding_mask->size(0) == q_s.size(0) && key_padding_mask->size(1) == q_s.size(2),
                "distillx: key_padding_mask must be a bool (B, L) tensor");
    mask = key_padding_mask->contiguous();
  }
  // Detached: the GEMMs below run on worker threads, which do not inherit the caller's
  // below-autograd dispatch state.
  const at::Tensor qs = q_s.detach().contiguous(), ks = k_s.detach().contiguous();
  const at::Tensor qt = q_t.detach().contiguous(), kt = k_t.detach().contiguous();
  at::Tensor gq = compute_grad ? at::empty_like(qs) : at::Tensor();
  at::Tensor gk = compute_grad ? at::zeros_like(ks) : at::Tensor();
  double total = 0;
  int64_t count = 0;
  if (qs.scalar_type() == at::kDouble) {
    relation_cpu_typed<double>(qs, ks, qt, kt, mask, gq, gk, total, count, compute_grad);
  } else {
    relation_cpu_typed<float>(qs, ks, qt, kt, mask, gq, gk, total, count, compute_grad);
  }
  if (compute_grad && count == 0) gq.zero_();
  at::Tensor loss = at::scalar_tensor(total, qs.options());
  if (!compute_grad) return {loss, at::empty({0}, qs.options()), at::empty({0}, qs.options())};
  return {loss, gq, gk};
}

}  // namespace

TORCH_LIBRARY_IMPL(distillx, CPU, m) { m.impl("attention_relation", &attention_relation_cpu); }

}  // namespace distillx
