"""Kernel Gram matching (KFD/SP) and kernel MMD (NST): choose the cheapest exact formulation.

* linear / cosine kernel (and its row-normalised SP form): feature-space identities,
  ``‖SSᵀ−TTᵀ‖²_F = ‖SᵀS‖² + ‖TᵀT‖² − 2‖SᵀT‖²`` — O(N·D²) time, O(D²) memory — when D < N,
  otherwise the (N, N) Gram matrices, which are then no larger than the inputs;
* polynomial / rbf / chebyshev: ``distillx::kernel_gram`` tiles the (N, N) matrices in row panels
  (never materialised) and computes the gradient in the same pass; with ``normalize_rows`` a first
  sweep gathers each Gram row's norm (and its dot with the teacher's row), a second the gradient
  (dense when N <= the width, where the Gram matrices are no larger than the inputs);
* a kernel given as a callable (third-party kernels): the dense reference.

C++: ``csrc/cpu/kernel_gram.cpp``, ``csrc/cuda/kernel_gram.cu``; the panel loop and both ops' host
code are ``csrc/include/distillx/kernel_gram.h``. ``distillx::kernel_gram`` and
``distillx::kernel_mmd`` return the loss and, in the same pass, its gradient w.r.t. the student rows;
backward only scales that gradient by the upstream scalar (a backward with ``create_graph=True``
differentiates the dense formulation of the op instead, so second-order gradients are exact). Kernel names, codes and parameters come
from :mod:`distillx.ops.kernel_table`.
"""
from __future__ import annotations

import functools

import torch

from . import reference as ref
from ._library import acc_dtype, register_scalar_loss, use_kernel
from .kernel_table import KERNELS, check_kernel, check_params


def _loss_and_grad(x, compute_grad):
    return x.new_empty(()), (x.new_empty(x.shape) if compute_grad else x.new_empty((0,)))


def _gram_fake(s, t, kernel, s_params, t_params, normalize_rows, panel_rows, compute_grad):
    return _loss_and_grad(s, compute_grad)


def _mmd_fake(s, t, weights, kernel, params, panel_rows, compute_grad):
    return _loss_and_grad(s, compute_grad)


def _panel_kernel(x, z, code, p):
    """The panel kernels' k(x_i, z_j) in PyTorch operations, from the op's parameter vector ``p``
    (see :func:`_side_params`; Chebyshev rows are already their features, T_1 in columns D:2D)."""
    p = p.to(x.dtype).tolist()
    g = x @ z.T
    if code == KERNELS["polynomial"].code:
        return (g * p[0] + p[1]) ** p[2]
    if code == KERNELS["rbf"].code:
        d2 = (x.pow(2).sum(1, keepdim=True) + z.pow(2).sum(1) - 2 * g).clamp(min=0)
        return torch.exp(-p[0] * d2)
    if code == KERNELS["chebyshev"].code:
        D = int(round(p[0]))
        return g / p[0] / torch.sqrt((1 - x[:, D:2 * D] @ z[:, D:2 * D].T / p[0]) + p[1])
    return g  # linear


def _gram_reference(s, t, kernel, s_params, t_params, normalize_rows, panel_rows, compute_grad):
    """``distillx::kernel_gram``'s loss in PyTorch operations (dense (N, N) Gram matrices)."""
    ks, kt = _panel_kernel(s, s, kernel, s_params), _panel_kernel(t, t, kernel, t_params)
    if normalize_rows:
        ks, kt = torch.nn.functional.normalize(ks, dim=1), torch.nn.functional.normalize(kt, dim=1)
    return (ks - kt).pow(2).mean()


def _mmd_reference(s, t, weights, kernel, params, panel_rows, compute_grad):
    """``distillx::kernel_mmd``'s loss aᵀ K a over x = [s; t] in PyTorch operations."""
    x = torch.cat([s, t])
    a = weights.to(x.dtype)
    return a @ _panel_kernel(x, x, kernel, params) @ a


register_scalar_loss("kernel_gram", _gram_fake, num_args=8, grad_args=(0,), compute_grad_arg=7,
                     reference=_gram_reference)
register_scalar_loss("kernel_mmd", _mmd_fake, num_args=7, grad_args=(0,), compute_grad_arg=6,
                     reference=_mmd_reference)


def resolve(kernel, params: dict):
    """``(kernel, params)`` checked: a built-in name with its validated parameters over their
    defaults, or a callable with the parameters bound (it rejects any it does not take when called,
    rather than them being silently ignored)."""
    kernel = check_kernel(kernel)
    if callable(kernel):
        return (functools.partial(kernel, **params) if params else kernel), {}
    return kernel, check_params(kernel, params)


def _linear_gram_loss(s, t, normalize_rows):
    """mean_ij (s_i·s_j − t_i·t_j)², or its row-normalised (SP) form, without (N, N) when D < N."""
    n = s.shape[0]
    if max(s.shape[1], t.shape[1]) >= n:
        return ref.kernel_gram_loss_reference(s, t, "linear", normalize_rows)
    acc = acc_dtype(s.dtype)
    s, t = s.to(acc), t.to(acc)
    if not normalize_rows:
        ss, tt, st = s.T @ s, t.T @ t, s.T @ t
        return (ss.pow(2).sum() + tt.pow(2).sum() - 2 * st.pow(2).sum()) / (n * n)
    # SP: rows of G = SSᵀ have norms sqrt(s_iᵀ(SᵀS)s_i); Σ_ij Ĝs_ij Ĝt_ij = Σ_i a_i b_i s_iᵀ(SᵀT)t_i.
    def inverse_row_norms(x):
        # 1/‖G_i‖ with ‖G_i‖² = x_iᵀ(XᵀX)x_i; a zero row (‖G_i‖ = 0) is left at 0, like F.normalize,
        # and its square root is never differentiated at 0.
        r2 = ((x @ (x.T @ x)) * x).sum(1)
        live = r2 > 0
        return torch.where(live, torch.where(live, r2, torch.ones_like(r2)).rsqrt(), torch.zeros_like(r2)), live

    a, live_s = inverse_row_norms(s)
    b, live_t = inverse_row_norms(t)
    cross = (a * b * ((s @ (s.T @ t)) * t).sum(1)).sum()
    return (live_s.sum() + live_t.sum() - 2 * cross) / (n * n)


def _side_params(kernel, x, params):
    """The op's parameter vector for one side (its own width D and, for rbf, its own σ²)."""
    D = x.shape[1]
    if kernel == "polynomial":
        return torch.tensor([1.0 / D, float(params["coef0"]), float(params["degree"])], dtype=torch.float64)
    if kernel == "rbf":
        sigma2 = params["sigma2"]
        sigma2 = ref.rbf_mean_sigma2(x) if sigma2 is None else torch.as_tensor(sigma2, dtype=x.dtype)
        return (0.5 / sigma2).reshape(1).to(torch.float64)
    return torch.tensor([float(D), float(params["eps"])], dtype=torch.float64)


def _center(x):
    """RBF distances are translation-invariant: centring the rows first avoids the float32
    cancellation of ‖x_i‖² + ‖x_j‖² − 2⟨x_i, x_j⟩ for features far from the origin."""
    return x - x.mean(0, keepdim=True)


def _fused_gram_loss(s, t, kernel, normalize_rows, params):
    acc = acc_dtype(s.dtype)
    xs, xt = s.to(acc), t.to(acc)
    if kernel == "rbf":
        xs, xt = _center(xs), _center(xt)
    ps, pt = _side_params(kernel, xs, params), _side_params(kernel, xt, params)
    if kernel == "chebyshev":
        xs, xt = (ref.chebyshev_features(x, params["order"], params["scale"]) for x in (xs, xt))
    compute_grad = torch.is_grad_enabled() and xs.requires_grad
    loss, _ = torch.ops.distillx.kernel_gram(xs, xt, KERNELS[kernel].code, ps, pt, bool(normalize_rows), 0,
                                             compute_grad)
    return loss


def kernel_gram_loss(s, t, kernel, normalize_rows, params):
    """:func:`distillx.functional.kernel_gram_loss` on validated rows ``s`` (N, Ds), ``t`` (N, Dt)
    (detached); ``kernel`` a built-in name or a callable."""
    kernel, params = resolve(kernel, dict(params))
    if callable(kernel):
        return ref.kernel_gram_loss_reference(s, t, kernel, normalize_rows)
    out_dtype = s.dtype
    # Half-precision inputs are computed in float32 like every path of the op: the cosine
    # normalisation and the dense forms below would otherwise run in bfloat16/float16 (a gradient
    # that is exactly 0 came out as 0.06 for cosine rows of width 1).
    s, t = s.to(acc_dtype(s.dtype)), t.to(acc_dtype(s.dtype))
    if kernel in ("linear", "cosine"):
        if kernel == "cosine":
            s, t = torch.nn.functional.normalize(s, dim=1), torch.nn.functional.normalize(t, dim=1)
        return _linear_gram_loss(s, t, normalize_rows).to(out_dtype)
    # Row-normalised with N <= width: the (N, N) Gram matrices are no larger than the inputs (the rule
    # of the linear kernel's switch), and the dense form is better conditioned there: with one or two
    # rows, a row of K_t is (nearly) proportional to its row of K_s and the tiled gradient
    # γ_i K_s − α_i K_t cancels to float32 rounding of terms ~1/|K_s|, where normalising each row first
    # cancels exactly.
    dense = normalize_rows and s.shape[0] <= max(s.shape[1], t.shape[1])
    if dense or not use_kernel("kernel_gram", s.device):
        return ref.kernel_gram_loss_reference(s, t, kernel, normalize_rows, **params).to(out_dtype)
    return _fused_gram_loss(s, t, kernel, normalize_rows, params).to(out_dtype)


def mmd_loss(s, t, kernel, params):
    """:func:`distillx.functional.mmd_loss` on validated rows ``s`` (N, D), ``t`` (M, D) (detached)."""
    kernel, params = resolve(kernel, dict(params))
    if callable(kernel) or not use_kernel("kernel_mmd", s.device):
        return ref.mmd_loss_reference(s, t, kernel, **params)
    return _fused_mmd_loss(s, t, kernel, params).to(s.dtype)


def _fused_mmd_loss(s, t, kernel, params):
    """MMD as the weighted Gram sum aᵀ K a over x = [s; t], a = [1/N…, −1/M…] (one σ² / Chebyshev
    scale for both sets, as in the reference), tiled by ``distillx::kernel_mmd``; only the student
    rows carry a gradient, so the teacher×teacher panels are loss-only."""
    acc = acc_dtype(s.dtype)
    x = torch.cat([s.to(acc), t.to(acc).detach()])
    if kernel == "rbf":
        # The shift is detached: the loss is translation-invariant, so the gradient through it is 0
        # and the teacher rows stay constants.
        x = x - x.detach().mean(0, keepdim=True)
    if kernel == "cosine":
        x, kernel = torch.nn.functional.normalize(x, dim=1), "linear"
    n, m = s.shape[0], t.shape[0]
    weights = torch.cat([x.new_full((n,), 1.0 / n), x.new_full((m,), -1.0 / m)])
    if kernel == "linear":
        p = torch.zeros(0, dtype=torch.float64)
    else:
        p = _side_params(kernel, x, params)
    if kernel == "chebyshev":
        x = ref.chebyshev_features(x, params["order"], params["scale"])
    xs, xt = x[:n], x[n:].detach()
    compute_grad = torch.is_grad_enabled() and xs.requires_grad
    loss, _ = torch.ops.distillx.kernel_mmd(xs, xt, weights, KERNELS[kernel].code, p, 0, compute_grad)
    return loss
