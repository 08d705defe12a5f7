// Host side of distillx::linear_divergence, device-agnostic: argument checks and the chunk loop.
// Each device supplies only its row kernel (the logit-divergence family's, see logit_divergence.h).
//
// Fused linear divergence: rows are processed in chunks so that only
// two (chunk, C) logit buffers ever exist. Per chunk: logits = hidden·Wᵀ + b for both sides (ATen
// GEMMs), the device's row kernel computes loss and overwrites the student logits with
// ∂loss/∂logits, and GEMMs fold that into the hidden/weight/bias gradients.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "distillx/checks.h"
#include "distillx/logit_divergence.h"

namespace distillx {

// RowKernel(student_logits (n,C) contiguous, teacher_logits (n,C) same dtype, weight (n,) acc dtype,
//           loss_out (n,) acc dtype, compute_grad) fills loss_out and, if compute_grad, overwrites
//           student_logits with the gradient.
// Device policy: how many bytes the two logit chunks may take when chunk_size is not given, and
// whether the weight gradient accumulates across chunks in float32 (exact, costs C·H·4 bytes) or in
// the input dtype (GEMMs still accumulate in float32 inside each chunk; the GPU memory bound needs it).
// float32_gemm: bfloat16/float16 inputs are multiplied in float32 (a CPU without native half GEMMs
// runs them ~30x slower than float32 ones): hidden chunks and blocks of weight rows are converted as
// they are used, so no float32 copy of a weight is ever held.
struct ChunkPolicy {
  int64_t chunk_bytes;
  bool float32_weight_grad;
  bool float32_gemm = false;
};

// Weight rows per converted block: about 8 MB of float32.
inline int64_t weight_block_rows(int64_t H) {
  return std::max<int64_t>(64, (int64_t{8} << 20) / (4 * std::max<int64_t>(H, 1)));
}

// out (n, C) = h · wᵀ (+ b), in out's dtype. When w's dtype differs, w is converted block by block
// of rows (out's column blocks are strided views the GEMM writes in place) and, with round_to_w,
// each block is rounded to w's dtype: the logits a model in that dtype produces (the teacher's).
inline void logits_into(at::Tensor& out, const at::Tensor& h, const at::Tensor& w, const std::optional<at::Tensor>& b,
                        bool round_to_w = false) {
  if (w.scalar_type() == out.scalar_type()) {
    const at::Tensor hh = h.to(out.scalar_type());
    if (b) at::addmm_out(out, b->to(out.scalar_type()), hh, w.t()); else at::mm_out(out, hh, w.t());
    return;
  }
  const at::Tensor hh = h.to(out.scalar_type());
  const int64_t C = w.size(0), step = weight_block_rows(w.size(1));
  for (int64_t c0 = 0; c0 < C; c0 += step) {
    const int64_t cb = std::min(step, C - c0);
    at::Tensor o = out.narrow(1, c0, cb);
    const at::Tensor wb = w.narrow(0, c0, cb).to(out.scalar_type());
    if (b) at::addmm_out(o, b->narrow(0, c0, cb).to(out.scalar_type()), hh, wb.t()); else at::mm_out(o, hh, wb.t());
    if (round_to_w) o.copy_(o.to(w.scalar_type()));
  }
}

// out (n, H) = g · w for g (n, C) in out's dtype, w converted block by block like logits_into.
inline void hidden_grad_into(at::Tensor& out, const at::Tensor& g, const at::Tensor& w) {
  if (w.scalar_type() == out.scalar_type()) {
    at::mm_out(out, g, w);
    return;
  }
  const int64_t C = w.size(0), step = weight_block_rows(w.size(1));
  for (int64_t c0 = 0; c0 < C; c0 += step) {
    const int64_t cb = std::min(step, C - c0);
    const at::Tensor wb = w.narrow(0, c0, cb).to(out.scalar_type());
    if (c0 == 0) at::mm_out(out, g.narrow(1, c0, cb), wb); else out.addmm_(g.narrow(1, c0, cb), wb);
  }
}

template <typename RowKernel>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunked_linear_divergence(
    const at::Tensor& hs, const at::Tensor& ws, const std::optional<at::Tensor>& bs, const at::Tensor& ht,
    const at::Tensor& wt, const std::optional<at::Tensor>& bt, const std::optional<at::Tensor>& row_weight,
    int64_t chunk_size, bool compute_grad, ChunkPolicy policy, RowKernel&& row_kernel) {
  check_matrix(hs, "student_hidden");
  check_matrix(ws, "student_weight");
  check_matrix(ht, "teacher_hidden");
  check_matrix(wt, "teacher_weight");
  const int64_t N = hs.size(0), C = ws.size(0);
  TORCH_CHECK(ws.size(1) == hs.size(1), "distillx: student_weight must have shape (C, ", hs.size(1), "), got ", ws.sizes());
  TORCH_CHECK(wt.size(1) == ht.size(1), "distillx: teacher_weight must have shape (C, ", ht.size(1), "), got ", wt.sizes());
  TORCH_CHECK(ht.size(0) == N, "distillx: teacher_hidden must have ", N, " rows like student_hidden, got ", ht.size(0));
  TORCH_CHECK(wt.size(0) == C, "distillx: teacher_weight must have ", C, " rows (classes) like student_weight, got ", wt.size(0));
  TORCH_CHECK(ws.scalar_type() == hs.scalar_type(), "distillx: student_weight dtype ", ws.scalar_type(),
              " must match student_hidden dtype ", hs.scalar_type());
  TORCH_CHECK(wt.scalar_type() == ht.scalar_type(), "distillx: teacher_weight dtype ", wt.scalar_type(),
              " must match teacher_hidden dtype ", ht.scalar_type());
  for (const auto* t : {&ws, &ht, &wt}) check_same_device(*t, hs, "every input", "student_hidden");
  if (bs) TORCH_CHECK(bs->dim() == 1 && bs->size(0) == C && bs->scalar_type() == hs.scalar_type(),
                      "distillx: student_bias must be (", C, ",) of dtype ", hs.scalar_type());
  if (bt) TORCH_CHECK(bt->dim() == 1 && bt->size(0) == C && bt->scalar_type() == ht.scalar_type(),
                      "distillx: teacher_bias must be (", C, ",) of dtype ", ht.scalar_type());
  check_row_weight(row_weight, hs, N);

  const auto dtype = hs.scalar_type();
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = hs.options();
  auto reduced = [](at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; };
  // The logits' dtype: the inputs', or float32 for half inputs under the float32_gemm policy.
  const auto gemm = policy.float32_gemm && reduced(dtype) ? at::kFloat : dtype;
  const auto gemm_t = policy.float32_gemm && reduced(ht.scalar_type()) ? at::kFloat : ht.scalar_type();
  if (chunk_size <= 0) {
    const int64_t row_bytes = 2 * std::max<int64_t>(C, 1) * static_cast<int64_t>(at::elementSize(gemm));
    chunk_size = std::max<int64_t>(1, policy.chunk_bytes / row_bytes);
  }
  chunk_size = std::max<int64_t>(1, std::min(chunk_size, N));

  at::Tensor loss = at::zeros({N}, opts.dtype(acc));
  at::Tensor weight = row_weight ? row_weight->to(acc).contiguous() : at::ones({N}, opts.dtype(acc));
  at::Tensor g_hs, g_ws, g_bs;
  if (compute_grad) {
    g_hs = at::empty_like(hs, at::MemoryFormat::Contiguous);
    const auto wacc = policy.float32_weight_grad ? acc : dtype;
    g_ws = at::zeros({C, hs.size(1)}, opts.dtype(wacc));
    if (bs) g_bs = at::zeros({C}, opts.dtype(acc));
  }
  at::Tensor ls_buf = at::empty({chunk_size, C}, opts.dtype(gemm));
  at::Tensor lt_buf = at::empty({chunk_size, C}, ht.options().dtype(gemm_t));
  at::Tensor lt_cast = gemm_t == gemm ? at::Tensor() : at::empty({chunk_size, C}, opts.dtype(gemm));
  // The hidden gradient of a chunk, in the logits' dtype when that is not the input's.
  at::Tensor gh_buf = compute_grad && gemm != dtype ? at::empty({chunk_size, hs.size(1)}, opts.dtype(gemm))
                                                    : at::Tensor();
  for (int64_t start = 0; start < N; start += chunk_size) {
    const int64_t n = std::min(chunk_size, N - start);
    at::Tensor h_s = hs.narrow(0, start, n), h_t = ht.narrow(0, start, n);
    at::Tensor ls = ls_buf.narrow(0, 0, n), lt = lt_buf.narrow(0, 0, n);
    logits_into(ls, h_s, ws, bs);
    logits_into(lt, h_t, wt, bt, /*round_to_w=*/true);
    at::Tensor lt_k = lt;
    if (lt_cast.defined()) lt_k = lt_cast.narrow(0, 0, n).copy_(lt);
    row_kernel(ls, lt_k, weight.narrow(0, start, n), loss.narrow(0, start, n), compute_grad);
    if (!compute_grad) continue;
    at::Tensor g_rows = gh_buf.defined() ? gh_buf.narrow(0, 0, n) : g_hs.narrow(0, start, n);
    hidden_grad_into(g_rows, ls, ws);
    if (gh_buf.defined()) g_hs.narrow(0, start, n).copy_(g_rows);
    // Dropped rows have a zero logit gradient, but 0 · (NaN hidden state) would still poison ∂W.
    const at::Tensor h_w = row_weight ? at::where(weight.narrow(0, start, n).ne(0).unsqueeze(1), h_s,
                                                  at::zeros({}, h_s.options()))
                                      : h_s;
    if (g_ws.scalar_type() == ls.scalar_type()) {
      g_ws.addmm_(ls.t(), h_w.to(ls.scalar_type()));
    } else {
      g_ws.add_(at::mm(ls.t(), h_w));
    }
    if (bs) g_bs.add_(ls.sum(0, /*keepdim=*/false, acc));
  }
  at::Tensor total = loss.sum();
  if (!compute_grad) return {total, loss, at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts)};
  return {total, loss, g_hs, g_ws.to(dtype), bs ? g_bs.to(dtype) : at::empty({0}, opts)};
}

// distillx::linear_divergence for any device: the chunk loop with the device's row kernel.
template <typename RowsFn>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_divergence_host(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const std::optional<at::Tensor>& student_bias,
    const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight, const std::optional<at::Tensor>& teacher_bias,
    const std::optional<at::Tensor>& row_weight, double temperature, int64_t divergence, double beta,
    int64_t chunk_size, bool compute_grad, ChunkPolicy policy, RowsFn&& rows) {
  check_divergence(divergence, temperature, beta);
  return chunked_linear_divergence(
      student_hidden.contiguous(), student_weight.contiguous(), student_bias, teacher_hidden.contiguous(),
      teacher_weight.contiguous(), teacher_bias, row_weight, chunk_size, compute_grad, policy,
      [&](const at::Tensor& ls, const at::Tensor& lt, const at::Tensor& w, const at::Tensor& loss, bool grad) {
        rows(ls, lt, w, loss, grad ? ls : at::Tensor());
      });
}

}  // namespace distillx
