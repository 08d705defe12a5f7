// Kernel Gram matching, mean_ij (k_s(s_i,s_j) − k_t(t_i,t_j))², over row panels: host code on ATen
// ops, so it serves every device. The (N, N) matrices are never held: rows I of the upper triangle
// (columns J ≥ I) are computed as one (B, N−I) panel, so every GEMM is done once and the
// gradient is assembled in the same pass (the loss is a scalar):
//   ∂L/∂x_i = 4/N² Σ_j D_ij ∂k(x_i, x_j)/∂x_i,   D = K_s − K_t, symmetric.
// Kernels on g = ⟨x_i, x_j⟩ (and row norms n_i = ‖x_i‖²):
//   0 linear      k = g
//   1 polynomial  k = (a·g + c)^d                 params {a, c, d}
//   2 rbf         k = exp(−γ(n_i + n_j − 2g))     params {γ}
//   3 chebyshev   k = g / (D·sqrt(1 − g₁/D + ε)),  x = [T_0(x̃)…T_n(x̃)], g₁ = ⟨x̃_i, x̃_j⟩ on columns
//                 [D, 2D) (T_1 is the identity)   params {D, ε}
//
// Row-normalised Gram matrices (SP-KD with any kernel), L = 1/N² Σ_ij (a_i Ks_ij − b_i Kt_ij)² with
// a_i = 1/‖Ks_i‖, b_i = 1/‖Kt_i‖, take two sweeps and still no (N, N):
//   1. row statistics ss_i = Σ_j Ks_ij², tt_i = Σ_j Kt_ij², st_i = Σ_j Ks_ij Kt_ij, so
//      L = 1/N² Σ_i (a_i² ss_i + b_i² tt_i − 2 a_i b_i st_i);
//   2. (gradient only) ∂L/∂Ks_ij = 2/N² (γ_i Ks_ij − α_i Kt_ij) with α_i = a_i b_i,
//      γ_i = a_i³ b_i st_i (the a_i² − a_i⁴ ss_i term of the derivative through a_i is zero), so the
//      symmetric pair weight is D_ij = ½((γ_i + γ_j) Ks_ij − (α_i + α_j) Kt_ij) in the formula above.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace distillx {

enum GramKernel : int64_t { kLinear = 0, kPolynomial = 1, kRBF = 2, kChebyshev = 3 };

// Kernel parameters arrive as a small 1-D tensor; read them on the host.
inline std::vector<double> gram_params(const at::Tensor& p) {
  TORCH_CHECK(p.dim() == 1, "distillx: kernel params must be a 1-D tensor, got shape ", p.sizes());
  const at::Tensor h = p.to(at::kCPU, at::kDouble).contiguous();
  return std::vector<double>(h.const_data_ptr<double>(), h.const_data_ptr<double>() + h.numel());
}

inline void check_gram_params(int64_t kernel, const std::vector<double>& p, const char* side) {
  TORCH_CHECK(kernel >= 0 && kernel <= 3, "distillx: kernel code must be 0..3, got ", kernel);
  const size_t want = kernel == kLinear ? 0 : kernel == kPolynomial ? 3 : kernel == kRBF ? 1 : 2;
  TORCH_CHECK(p.size() == want, "distillx: ", side, "_params must have ", want, " values for kernel ", kernel,
              ", got ", p.size());
}

// The elementwise part of one panel, after the GEMMs: given the student and teacher Gram panels
// gs, gt of (b, cols) entries, laid out as PanelLayout says (and for chebyshev the T_1-block panels
// g1s, g1t), it returns Σ w_j D_ij² with
// w = 1 on the diagonal block (columns < b) and 2 elsewhere (the lower triangle by symmetry), and,
// when grad, overwrites gs with M = D ∘ ∂k_s/∂g and g1s with D ∘ ∂k_s/∂g₁ (chebyshev).
// MMD mode (ai/ap defined, one side only): D_ij is replaced by a_i a_j and the sum is Σ w_j a_i a_j k_ij.
enum PanelMode : int { kPlainLoss = 0, kRowStats = 1, kRowNormGrad = 2 };

// Where entry (i, j) of a (b, cols) panel lies in its buffers: rows-major at i·cols + j (CUDA), or
// cols-major at j·b + i (CPU). Cols-major hands BLAS the product with its long side first, which CPU
// BLAS splits across threads far better: the panel GEMMs of a 64-row panel ran ~20% faster at 2
// threads (N = 4096, widths 128 and 512).
enum PanelLayout : int { kPanelRowsMajor = 0, kPanelColsMajor = 1 };

struct PanelArgs {
  int64_t kernel;
  const std::vector<double>& ps;
  const std::vector<double>& pt;
  at::Tensor gs, gt, g1s, g1t;        // contiguous buffers, (b, cols) or (cols, b) by layout; gt, g1t undefined in MMD mode
  at::Tensor nsi, nsp, nti, ntp;      // rbf squared norms of the panel rows / columns
  int64_t diag;                       // b
  bool grad;
  at::Tensor ai, ap;                  // MMD mode: row weights of the panel rows / columns (no teacher side)
  int mode = kPlainLoss;
  // kRowStats: float64 (·, 3) rows {ss, tt, st} of the panel rows / columns, accumulated into.
  // kRowNormGrad: (·, 2) rows {γ, α} of the panel rows / columns, in the inputs' dtype.
  at::Tensor ri, rp;
  int layout = kPanelRowsMajor;
};

// Returns (loss, grad_s): loss as a 0-d tensor of the inputs' dtype; grad_s (N, Ds) or empty.
template <typename PanelFn>
std::tuple<at::Tensor, at::Tensor> gram_loss_panels(const at::Tensor& s, const at::Tensor& t, int64_t kernel,
                                                    const std::vector<double>& ps, const std::vector<double>& pt,
                                                    int64_t panel_rows, bool compute_grad, PanelFn&& panel,
                                                    const at::Tensor& mmd_weights = at::Tensor(),
                                                    bool normalize_rows = false, int64_t grad_rows = -1,
                                                    PanelLayout layout = kPanelRowsMajor) {
  // MMD mode: one set x = s with row weights a; loss Σ_ij a_i a_j k(x_i, x_j), ∂/∂x_i = 2 Σ_j a_i a_j ∂k.
  // grad_rows >= 0: only the first grad_rows rows of s are variables (the rest are constants, e.g. the
  // teacher's half of the MMD set), so panels below them skip the gradient and grad_s has grad_rows rows.
  const bool mmd = mmd_weights.defined();
  TORCH_CHECK(!(mmd && normalize_rows), "distillx: MMD has no row-normalised form");
  TORCH_CHECK(s.dim() == 2 && t.dim() == 2, "distillx: kernel_gram expects 2-D s and t, got ", s.sizes(), " and ",
              t.sizes());
  TORCH_CHECK(s.size(0) == t.size(0), "distillx: s and t must have the same number of rows, got ", s.size(0),
              " and ", t.size(0));
  TORCH_CHECK(s.scalar_type() == t.scalar_type() &&
                  (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
              "distillx: kernel_gram expects float32 or float64 s and t of one dtype, got ", s.scalar_type(), " and ",
              t.scalar_type());
  TORCH_CHECK(s.device() == t.device(), "distillx: s is on ", s.device(), " but t is on ", t.device());
  check_gram_params(kernel, ps, "s");
  check_gram_params(kernel, pt, "t");
  const bool cheb = kernel == kChebyshev;
  const int64_t Ds1 = cheb ? static_cast<int64_t>(ps[0]) : 0, Dt1 = cheb ? static_cast<int64_t>(pt[0]) : 0;
  if (cheb) {
    TORCH_CHECK(s.size(1) >= 2 * Ds1 && t.size(1) >= 2 * Dt1,
                "distillx: chebyshev features must hold at least the T_0 and T_1 blocks of width D");
  }
  const at::Tensor x = s.contiguous(), y = t.contiguous();
  const int64_t N = x.size(0);
  const int64_t G = grad_rows < 0 ? N : std::min(grad_rows, N);
  if (panel_rows <= 0) {
    // Keep the panel buffers near 2 MB in all so the elementwise sweep runs in cache: a buffer of
    // 1 MB per side, or 2 MB for MMD's one side (twice the rows: a wider GEMM, the same memory).
    const int64_t budget = mmd ? (int64_t{1} << 19) : (int64_t{1} << 18);
    panel_rows = std::max<int64_t>(16, std::min<int64_t>(256, budget / std::max<int64_t>(N, 1)));
  }
  panel_rows = std::max<int64_t>(1, std::min(panel_rows, std::max<int64_t>(N, 1)));
  const bool rbf = kernel == kRBF;
  const at::Tensor nx = rbf ? x.square().sum(1) : at::Tensor(), ny = rbf ? y.square().sum(1) : at::Tensor();
  const at::Tensor wts = mmd ? mmd_weights.to(x.scalar_type()).contiguous() : at::Tensor();
  if (mmd) TORCH_CHECK(wts.dim() == 1 && wts.size(0) == N, "distillx: MMD weights must be (", N, ",)");
  at::Tensor grad, rowsum;
  // Panel buffers, allocated once and reused (fresh pages per panel cost more than the math).
  const int64_t cap = panel_rows * N;
  // MMD has no teacher side: no buffers for it.
  at::Tensor bs = at::empty({cap}, x.options()), bt = mmd ? at::Tensor() : at::empty({cap}, x.options());
  at::Tensor b1s = cheb ? at::empty({cap}, x.options()) : at::Tensor();
  at::Tensor b1t = cheb && !mmd ? at::empty({cap}, x.options()) : at::Tensor();
  const bool cols_major = layout == kPanelColsMajor;
  auto panel_view = [&](const at::Tensor& buf, int64_t b, int64_t cols) {
    if (!buf.defined()) return at::Tensor();
    const at::Tensor flat = buf.narrow(0, 0, b * cols);
    return cols_major ? flat.view({cols, b}) : flat.view({b, cols});
  };
  // out ← the Gram panel rows·colsᵀ in the buffer's layout.
  auto gram = [&](at::Tensor& out, const at::Tensor& rows, const at::Tensor& cols) {
    if (cols_major) {
      at::mm_out(out, cols, rows.t());
    } else {
      at::mm_out(out, rows, cols.t());
    }
  };
  // The (b, cols) view of a buffer, whatever its layout (the gradient GEMMs take either stride).
  auto entries = [&](const at::Tensor& buf) { return cols_major ? buf.t() : buf; };

  // One sweep over the upper-triangle panels; `rows` holds the per-row tensor of the mode (stats or
  // coefficients). Returns the sum of the panels' loss terms; with grad, accumulates Σ_j M_ij ∂k.
  auto sweep = [&](int mode, bool with_grad, const at::Tensor& rows) {
    double total = 0;
    if (with_grad) {
      grad = at::zeros({G, x.size(1)}, x.options());
      rowsum = rbf ? at::zeros({G}, x.options()) : at::Tensor();
    }
    for (int64_t i0 = 0; i0 < N; i0 += panel_rows) {
      const int64_t b = std::min(panel_rows, N - i0), cols = N - i0;
      const at::Tensor xi = x.narrow(0, i0, b), xp = x.narrow(0, i0, cols);
      const at::Tensor yi = y.narrow(0, i0, b), yp = y.narrow(0, i0, cols);
      const bool panel_grad = with_grad && i0 < G;
      PanelArgs a{kernel, ps, pt, panel_view(bs, b, cols), panel_view(bt, b, cols),
                  at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), b, panel_grad,
                  mmd ? wts.narrow(0, i0, b) : at::Tensor(), mmd ? wts.narrow(0, i0, cols) : at::Tensor(), mode,
                  rows.defined() ? rows.narrow(0, i0, b) : at::Tensor(),
                  rows.defined() ? rows.narrow(0, i0, cols) : at::Tensor(), layout};
      gram(a.gs, xi, xp);
      if (!mmd) gram(a.gt, yi, yp);
      if (cheb) {
        a.g1s = panel_view(b1s, b, cols);
        a.g1t = panel_view(b1t, b, cols);
        gram(a.g1s, xi.narrow(1, Ds1, Ds1), xp.narrow(1, Ds1, Ds1));
        if (!mmd) gram(a.g1t, yi.narrow(1, Dt1, Dt1), yp.narrow(1, Dt1, Dt1));
      }
      if (rbf) {
        a.nsi = nx.narrow(0, i0, b), a.nsp = nx.narrow(0, i0, cols);
        a.nti = ny.narrow(0, i0, b), a.ntp = ny.narrow(0, i0, cols);
      }
      total += panel(a);
      if (!panel_grad) continue;
      // Rows of the panel, and columns right of its diagonal block, that are variables.
      const int64_t bg = std::min(b, G - i0), cg = std::min(cols, G - i0) - b;
      const at::Tensor ms = entries(a.gs), m = ms.narrow(0, 0, bg);
      grad.narrow(0, i0, bg).addmm_(m, xp);
      if (cg > 0) grad.narrow(0, i0 + b, cg).addmm_(ms.narrow(1, b, cg).t(), xi);
      if (rbf) {
        rowsum.narrow(0, i0, bg).add_(m.sum(1));
        if (cg > 0) rowsum.narrow(0, i0 + b, cg).add_(ms.narrow(1, b, cg).sum(0));
      }
      if (cheb) {
        const at::Tensor m1 = entries(a.g1s);
        grad.narrow(0, i0, bg).narrow(1, Ds1, Ds1).addmm_(m1.narrow(0, 0, bg), xp.narrow(1, Ds1, Ds1));
        if (cg > 0)
          grad.narrow(0, i0 + b, cg).narrow(1, Ds1, Ds1).addmm_(m1.narrow(1, b, cg).t(), xi.narrow(1, Ds1, Ds1));
      }
    }
    return total;
  };

  const double n_rows = static_cast<double>(std::max<int64_t>(N, 1));
  const double inv_n2 = mmd ? 1.0 : 1.0 / (n_rows * n_rows);
  double total = 0;
  if (!normalize_rows) {
    total = sweep(kPlainLoss, compute_grad, at::Tensor());
  } else {
    const at::Tensor stats = at::zeros({N, 3}, x.options().dtype(at::kDouble));
    sweep(kRowStats, false, stats);
    const at::Tensor ss = stats.select(1, 0), tt = stats.select(1, 1), st = stats.select(1, 2);
    // A zero Gram row stays zero (a_i = 0), as F.normalize leaves it; rsqrt is never taken of 0.
    auto inverse_norm = [](const at::Tensor& sq) {
      const at::Tensor live = sq > 0;
      return at::where(live, at::where(live, sq, at::ones_like(sq)).rsqrt(), at::zeros_like(sq));
    };
    const at::Tensor ra = inverse_norm(ss), rb = inverse_norm(tt);
    total = (ra.square() * ss + rb.square() * tt - 2 * ra * rb * st).sum().item<double>();
    if (compute_grad) {
      const at::Tensor coef = at::stack({ra.pow(3) * rb * st, ra * rb}, 1).to(x.scalar_type()).contiguous();
      sweep(kRowNormGrad, true, coef);
    }
  }
  at::Tensor loss = at::scalar_tensor(total * inv_n2, x.options());
  if (!compute_grad) return {loss, at::empty({0}, x.options())};
  // rbf: ∂k/∂x_i = 2γ k (x_j − x_i): the Σ_j M_ij x_j part is above, the −(Σ_j M_ij) x_i part here.
  if (rbf) grad.sub_(rowsum.unsqueeze(1) * x.narrow(0, 0, G));
  grad.mul_(mmd ? 2.0 : 4.0 * inv_n2);
  return {loss, grad};
}

// The two ops on top of the panel loop, for any device's panel function.
template <typename PanelFn>
std::tuple<at::Tensor, at::Tensor> kernel_gram_host(const at::Tensor& s, const at::Tensor& t, int64_t kernel,
                                                    const at::Tensor& s_params, const at::Tensor& t_params,
                                                    bool normalize_rows, int64_t panel_rows, bool compute_grad,
                                                    PanelFn&& panel, PanelLayout layout = kPanelRowsMajor) {
  return gram_loss_panels(s, t, kernel, gram_params(s_params), gram_params(t_params), panel_rows, compute_grad, panel,
                          at::Tensor(), normalize_rows, -1, layout);
}

template <typename PanelFn>
std::tuple<at::Tensor, at::Tensor> kernel_mmd_host(const at::Tensor& s, const at::Tensor& t, const at::Tensor& weights,
                                                   int64_t kernel, const at::Tensor& params, int64_t panel_rows,
                                                   bool compute_grad, PanelFn&& panel,
                                                   PanelLayout layout = kPanelRowsMajor) {
  TORCH_CHECK(s.dim() == 2 && t.dim() == 2 && s.size(1) == t.size(1),
              "distillx: kernel_mmd expects s (N, D) and t (M, D) of one width, got ", s.sizes(), " and ", t.sizes());
  TORCH_CHECK(s.device() == t.device(), "distillx: s is on ", s.device(), " but t is on ", t.device());
  TORCH_CHECK(weights.device() == s.device(), "distillx: weights are on ", weights.device(), " but s is on ",
              s.device());
  const std::vector<double> p = gram_params(params);
  const at::Tensor x = at::cat({s, t});
  return gram_loss_panels(x, x, kernel, p, p, panel_rows, compute_grad, panel, weights, false, s.size(0), layout);
}

}  // namespace distillx
