// CUDA kernels of the MiniLM attention-relation loss (distillx::attention_relation and its backward).
// Same scheme as the CPU: tiles of (chunk of batch·heads) × (query block) × (key block) scores come
// from batched GEMMs (cuBLAS through ATen) into reused buffers of at most 2M elements per side, so
// memory is bounded whatever L; the per-row online softmax, the KL and the gradient are the kernels of
// include/distillx/cuda/attention_relation.cuh, on the current stream. The backward recomputes the tiles.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "distillx/cuda/attention_relation.cuh"
#include "distillx/attention_relation.h"

namespace distillx {
namespace {

constexpr int64_t kTileElements = int64_t{1} << 21;

struct Plan {
  int64_t B, A, L, BA, bq, bk, cb, rows_valid;
  at::Tensor qs, ks, qt, kt, mask;
};

Plan make_plan(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
               const std::optional<at::Tensor>& key_padding_mask) {
  Plan p;
  p.B = q_s.size(0), p.A = q_s.size(1), p.L = q_s.size(2), p.BA = p.B * p.A;
  p.qs = q_s.detach().contiguous().view({p.BA, p.L, q_s.size(3)});
  p.ks = k_s.detach().contiguous().view({p.BA, p.L, k_s.size(3)});
  p.qt = q_t.detach().contiguous().view({p.BA, p.L, q_t.size(3)});
  p.kt = k_t.detach().contiguous().view({p.BA, p.L, k_t.size(3)});
  if (key_padding_mask) p.mask = key_padding_mask->contiguous();
  p.rows_valid = p.mask.defined() ? p.mask.sum().item<int64_t>() * p.A : p.BA * p.L;
  p.bq = std::min<int64_t>(std::max<int64_t>(p.L, 1), 64);
  p.bk = std::min<int64_t>(std::max<int64_t>(p.L, 1), 512);
  p.cb = std::max<int64_t>(1, kTileElements / (p.bq * p.bk));
  return p;
}

// Calls fn(tile, zs, zt, qs_blk, ks_blk) for every tile after computing both sides' scaled scores.
template <typename Fn, typename Begin, typename End>
void for_each_tile(const Plan& p, at::Tensor& zs_buf, at::Tensor& zt_buf, Begin&& begin_rows, Fn&& fn,
                   End&& end_rows) {
  const double ss = 1.0 / std::sqrt(static_cast<double>(p.qs.size(2)));
  const double st = 1.0 / std::sqrt(static_cast<double>(p.qt.size(2)));
  for (int64_t ba0 = 0; ba0 < p.BA; ba0 += p.cb) {
    const int64_t c = std::min(p.cb, p.BA - ba0);
    for (int64_t i0 = 0; i0 < p.L; i0 += p.bq) {
      const int64_t n = std::min(p.bq, p.L - i0);
      cuda::RelationTile tile{ba0, c * n, n, 0, i0, 0, p.A, p.L,
                              p.mask.defined() ? p.mask.const_data_ptr<bool>() : nullptr};
      begin_rows(tile);
      const at::Tensor q_s = p.qs.narrow(0, ba0, c).narrow(1, i0, n), q_t = p.qt.narrow(0, ba0, c).narrow(1, i0, n);
      for (int64_t j0 = 0; j0 < p.L; j0 += p.bk) {
        const int64_t nk = std::min(p.bk, p.L - j0);
        tile.j0 = j0, tile.nk = nk;
        at::Tensor zs = zs_buf.narrow(0, 0, c * n * nk).view({c, n, nk});
        at::Tensor zt = zt_buf.narrow(0, 0, c * n * nk).view({c, n, nk});
        const at::Tensor k_s = p.ks.narrow(0, ba0, c).narrow(1, j0, nk);
        // β = 0: the buffers' old contents are ignored; α applies 1/√d inside the GEMM.
        at::baddbmm_out(zs, zs, q_s, k_s.transpose(1, 2), 0, ss);
        at::baddbmm_out(zt, zt, q_t, p.kt.narrow(0, ba0, c).narrow(1, j0, nk).transpose(1, 2), 0, st);
        fn(tile, zs, zt, q_s, k_s, ss);
      }
      end_rows(tile);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> attention_relation_cuda(const at::Tensor& q_s, const at::Tensor& k_s,
                                                           const at::Tensor& q_t, const at::Tensor& k_t,
                                                           const std::optional<at::Tensor>& key_padding_mask) {
  check_relation_inputs(q_s, k_s, q_t, k_t, key_padding_mask);
  const c10::cuda::CUDAGuard guard(q_s.device());
  at::Tensor stats = at::zeros({q_s.size(0), q_s.size(1), q_s.size(2), 2}, q_s.options());
  Plan p = make_plan(q_s, k_s, q_t, k_t, key_padding_mask);
  if (p.rows_valid == 0 || p.L == 0) return {at::zeros({}, q_s.options()), stats};
  const int64_t cap = p.cb * p.bq * p.bk;
  at::Tensor zs_buf = at::empty({cap}, q_s.options()), zt_buf = at::empty({cap}, q_s.options());
  // Five arrays of `rows` values, packed at the front: ms, ls, mt, lt, acc.
  at::Tensor state = at::empty({5 * p.cb * p.bq}, q_s.options());
  at::Tensor total = at::zeros({}, q_s.options().dtype(at::kDouble));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q_s.scalar_type(), "distillx_attention_relation_cuda", [&] {
    using T = scalar_t;
    const double inf = std::numeric_limits<double>::infinity();
    for_each_tile(
        p, zs_buf, zt_buf,
        [&](const cuda::RelationTile& tile) {
          at::Tensor st = state.narrow(0, 0, 5 * tile.rows).view({5, tile.rows});
          st[0].fill_(-inf), st[1].zero_(), st[2].fill_(-inf), st[3].zero_(), st[4].zero_();
        },
        [&](const cuda::RelationTile& tile, at::Tensor& zs, at::Tensor& zt, const at::Tensor&, const at::Tensor&,
            double) {
          cuda::launch_relation_update<T>(zs.const_data_ptr<T>(), zt.const_data_ptr<T>(), tile,
                                          state.mutable_data_ptr<T>(), stream);
        },
        [&](const cuda::RelationTile& tile) {
          cuda::launch_relation_finish<T>(state.const_data_ptr<T>(), tile, stats.mutable_data_ptr<T>(),
                                          total.mutable_data_ptr<double>(), stream);
        });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {(total / static_cast<double>(p.rows_valid)).to(q_s.scalar_type()), stats};
}

std::tuple<at::Tensor, at::Tensor> attention_relation_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& q_t, const at::Tensor& k_t,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& stats) {
  check_relation_inputs(q_s, k_s, q_t, k_t, key_padding_mask);
  check_relation_stats(stats, q_s, grad);
  const c10::cuda::CUDAGuard guard(q_s.device());
  Plan p = make_plan(q_s, k_s, q_t, k_t, key_padding_mask);
  at::Tensor gq = at::zeros_like(p.qs), gk = at::zeros_like(p.ks);
  if (p.rows_valid == 0 || p.L == 0) return {gq.view(q_s.sizes()), gk.view(k_s.sizes())};
  const at::Tensor lse = stats.contiguous();
  const int64_t cap = p.cb * p.bq * p.bk;
  at::Tensor zs_buf = at::empty({cap}, q_s.options()), zt_buf = at::empty({cap}, q_s.options());
  const double scale = grad.item<double>() / static_cast<double>(p.rows_valid);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q_s.scalar_type(), "distillx_attention_relation_backward_cuda", [&] {
    using T = scalar_t;
    for_each_tile(
        p, zs_buf, zt_buf, [](const cuda::RelationTile&) {},
        [&](const cuda::RelationTile& tile, at::Tensor& zs, at::Tensor& zt, const at::Tensor& q_blk,
            const at::Tensor& k_blk, double ss) {
          cuda::launch_relation_grad<T>(zs.mutable_data_ptr<T>(), zt.const_data_ptr<T>(), tile,
                                        lse.const_data_ptr<T>(), static_cast<T>(scale), stream);
          // z_s = q_s k_sᵀ/√ds: ∂q_s += ∂Z k_s/√ds, ∂k_s += ∂Zᵀ q_s/√ds.
          gq.narrow(0, tile.ba0, zs.size(0)).narrow(1, tile.i0, tile.n).baddbmm_(zs, k_blk, 1, ss);
          gk.narrow(0, tile.ba0, zs.size(0)).narrow(1, tile.j0, tile.nk).baddbmm_(zs.transpose(1, 2), q_blk, 1, ss);
        },
        [](const cuda::RelationTile&) {});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gq.view(q_s.sizes()), gk.view(k_s.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(distillx, CUDA, m) {
  m.impl("attention_relation", &attention_relation_cuda);
  m.impl("attention_relation_backward", &attention_relation_backward_cuda);
}

}  // namespace distillx
