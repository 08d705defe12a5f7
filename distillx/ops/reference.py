"""Pure-PyTorch references of every distillx op.

They define the semantics the compiled kernels must reproduce, serve as the fallback when
``distillx._C`` is missing, and are the "eager PyTorch" column of ``distillx bench``. They favour
clarity and exactness over speed and memory (they materialise full (N, C) tensors).
"""
from __future__ import annotations

import functools
import math

import torch

from .kernel_table import KERNELS, kernel_result

DIVERGENCES = ("kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _xlogy_diff(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``w * (a - b)`` with the convention ``0 * anything = 0`` (0·log 0 = 0, so -inf logits are allowed).

    The difference is masked *before* the product so the backward never multiplies 0 by inf/NaN;
    a NaN in ``w`` still propagates (a non-finite logit in a kept row is never silently dropped).
    """
    zero = w == 0
    diff = torch.where(zero, torch.zeros((), dtype=a.dtype, device=a.device), a - b)
    return torch.where(zero, torch.zeros((), dtype=w.dtype, device=w.device), w * diff)


def _log_mixture(lp, lq, beta):
    """log(βp + (1−β)q) as a log-sum-exp of the log-probabilities: finite even when the mixture
    of two tiny probabilities rounds to 0; entries where both are 0 get a finite placeholder (the
    terms using them are masked) so the backward stays NaN-free."""
    both = torch.isneginf(lp) & torch.isneginf(lq)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    lp, lq = torch.where(both, zero, lp), torch.where(both, zero, lq)
    if beta == 0:
        return lq
    if beta == 1:
        return lp
    return torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))


def divergence_rows(student_logits, teacher_logits, temperature=1.0, divergence="kl", beta=0.5):
    """Per-row divergence ``T² · D(p, q)`` of logits (N, C), computed in float32 (float64 for float64 input).

    p = softmax(teacher / T), q = softmax(student / T); D is KL(p‖q), KL(q‖p), or
    JSD_β = β·KL(p‖m) + (1−β)·KL(q‖m) with m = βp + (1−β)q. The teacher is treated as a constant.
    """
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = student_logits.to(acc) / temperature
    t = teacher_logits.detach().to(acc) / temperature
    lq = torch.log_softmax(s, dim=-1)
    lp = torch.log_softmax(t, dim=-1)
    p, q = lp.exp(), lq.exp()
    if divergence == "kl":
        terms = _xlogy_diff(p, lp, lq)
    elif divergence == "reverse_kl":
        terms = _xlogy_diff(q, lq, lp)
    elif divergence == "jsd":
        lm = _log_mixture(lp, lq, beta)
        # A side whose weight is 0 contributes nothing (and may hold inf where the mixture is 0).
        terms = torch.zeros_like(p)
        if beta != 0:
            terms = terms + beta * _xlogy_diff(p, lp, lm)
        if beta != 1:
            terms = terms + (1.0 - beta) * _xlogy_diff(q, lq, lm)
        else:
            terms = terms + 0 * q  # β = 1 does not depend on the student: a zero gradient, like the kernel
    else:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    rows = terms.sum(-1) * (temperature * temperature)
    # A row whose student or teacher logits are all -inf has no distribution: it contributes nothing.
    undefined = torch.isneginf(s).all(-1) | torch.isneginf(t).all(-1)
    return torch.where(undefined, torch.zeros_like(rows), rows)


def reduce_rows(rows, mask, reduction, num_classes):
    """Apply ``mask`` (rows to keep, shape (N,)) and ``reduction`` to per-row losses (N,)."""
    if mask is None:
        kept = rows.new_tensor(float(rows.shape[0]))
    else:
        rows = torch.where(mask, rows, torch.zeros_like(rows))
        kept = mask.sum().to(rows.dtype)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    denom = kept * num_classes if reduction == "mean" else kept
    # All rows masked: the loss is 0 (and so is its gradient), never 0/0.
    return total / denom.clamp(min=1)


def kd_loss_reference(student_logits, teacher_logits, temperature=1.0, divergence="kl", beta=0.5,
                      reduction="batchmean", mask=None):
    """Reference of :func:`distillx.functional.kd_loss` (inputs already validated)."""
    shape = student_logits.shape
    C = shape[-1]
    s = student_logits.reshape(-1, C)
    t = teacher_logits.reshape(-1, C)
    m = None if mask is None else mask.reshape(-1)
    if m is not None:
        # Rows that are dropped must not leak NaN/inf into the gradient through torch.where.
        keep = m[:, None]
        s = torch.where(keep, s, torch.zeros((), dtype=s.dtype))
        t = torch.where(keep, t, torch.zeros((), dtype=t.dtype))
    rows = divergence_rows(s, t, temperature, divergence, beta)
    out = reduce_rows(rows, m, reduction, C)
    if reduction == "none":
        out = out.reshape(shape[:-1])
    return out.to(student_logits.dtype)


def linear_kd_loss_reference(student_hidden, student_weight, teacher_hidden, teacher_weight,
                             student_bias=None, teacher_bias=None, temperature=1.0, divergence="kl",
                             beta=0.5, reduction="batchmean", mask=None):
    """Reference of :func:`distillx.functional.linear_kd_loss`: materialises both (N, C) logit tensors."""
    if mask is not None:
        # Dropped rows must not reach the weight gradient either (0 · NaN hidden state = NaN).
        keep = mask.reshape(student_hidden.shape[:-1] + (1,))
        student_hidden = torch.where(keep, student_hidden, torch.zeros((), dtype=student_hidden.dtype))
    s = torch.nn.functional.linear(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        t = torch.nn.functional.linear(teacher_hidden, teacher_weight, teacher_bias)
    return kd_loss_reference(s, t, temperature, divergence, beta, reduction, mask)


# --- kernel-function distillation (KFD) and MMD (NST) -------------------------------------------



def rbf_mean_sigma2(x: torch.Tensor) -> torch.Tensor:
    """Mean pairwise squared distance of the rows, ``2N/(N−1)·mean‖y_i − ȳ‖²`` in O(N·D), detached,
    with ``y_i = x_i − x_0`` (distances do not change).

    Falls back to 1 when it is 0 or undefined (one row, or identical rows: every kernel value is 1 then).
    Identical rows give exactly 0 this way: the form ``mean‖x_i‖² − ‖x̄‖²`` (or centring by the
    rounded mean) left a residue of 1e-16 to 1e-32, a σ² that turned the reference's gradient into noise.
    """
    x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    n = x.shape[0]
    if n < 2:
        return x.new_tensor(1.0)
    # mean‖y_i − ȳ‖² is the sum of the columns' population variances: one (N, D) temporary (y), not three
    sq = (x - x[:1]).var(0, correction=0).sum()
    s2 = (2.0 * n / (n - 1)) * sq
    return torch.where(s2 > 0, s2, torch.ones_like(s2))


def chebyshev_features(x: torch.Tensor, order: int = 3, scale=None) -> torch.Tensor:
    """``[T_0(x̃), …, T_n(x̃)]`` with ``x̃ = x / scale``, shape (N, (n+1)·D).

    ``scale`` defaults to max|x| over the batch, detached (so x̃ ∈ [−1, 1]); pass a number to fix it.
    """
    if scale is None:
        scale = x.detach().abs().amax().clamp(min=torch.finfo(x.dtype).tiny)
    u = x / scale
    terms = [torch.ones_like(u), u]
    for _ in range(2, order + 1):
        terms.append(2 * u * terms[-1] - terms[-2])
    return torch.cat(terms[: order + 1], dim=1)


def kernel_matrix(x, z, kernel="rbf", **params):
    """Dense kernel matrix k(x_i, z_j) (N, M) of rows of x (N, D) and z (M, D): the reference definition
    of the built-in kernels of :mod:`distillx.ops.kernel_table` (``params`` over its defaults).

    linear ⟨x,z⟩; polynomial (⟨x,z⟩/D + coef0)^degree; cosine ⟨x,z⟩/(‖x‖‖z‖); rbf exp(−‖x−z‖²/(2σ²))
    with σ² given or the mean pairwise squared distance of ``x`` (when x is z) / of both sets
    concatenated; chebyshev (generalised, Ozer et al. 2011): with x̃ = x/scale (default max|x|, detached),
    (1/D)·Σ_{i≤n} ⟨T_i(x̃),T_i(z̃)⟩ / sqrt(1 − ⟨x̃,z̃⟩/D + eps).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {tuple(KERNELS)}, got {kernel!r}")
    unknown = sorted(set(params) - set(KERNELS[kernel].defaults))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for kernel {kernel!r}; it takes "
                         f"{list(KERNELS[kernel].defaults) or 'none'}")
    p = {**KERNELS[kernel].defaults, **params}
    D = x.shape[1]
    if kernel == "linear":
        return x @ z.T
    if kernel == "polynomial":
        return (x @ z.T / D + p["coef0"]) ** p["degree"]
    if kernel == "rbf":
        sigma2 = p["sigma2"]
        if sigma2 is None:
            sigma2 = rbf_mean_sigma2(x if x is z else torch.cat([x, z]))
        d2 = (x.pow(2).sum(1, keepdim=True) + z.pow(2).sum(1) - 2 * x @ z.T).clamp(min=0)
        return torch.exp(-d2 / (2 * sigma2))
    if kernel == "chebyshev":
        both = chebyshev_features(x if x is z else torch.cat([x, z]), p["order"], p["scale"])
        fx, fz = (both, both) if x is z else (both[: x.shape[0]], both[x.shape[0]:])
        ux, uz = fx[:, D:2 * D], fz[:, D:2 * D]
        return (fx @ fz.T) / D / torch.sqrt(1 - ux @ uz.T / D + p["eps"])
    return torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(z, dim=1).T  # cosine


def kernel_gram_loss_reference(s, t, kernel="rbf", normalize_rows=False, **kernel_params):
    """``mean_ij (k_s(s_i,s_j) − k_t(t_i,t_j))²`` with dense (N, N) Gram matrices.

    Each side uses its own width (and its own σ² for rbf). ``normalize_rows`` L2-normalises each row
    of both Gram matrices first (with the linear kernel: Similarity-Preserving KD, Tung & Mori 2019).
    """
    t = t.detach()  # one object, so kernel_matrix sees x is z (per-side σ², Chebyshev scale)
    if callable(kernel):
        ks, kt = kernel_result(kernel, s, s), kernel_result(kernel, t, t)
    else:
        ks = kernel_matrix(s, s, kernel, **kernel_params)
        kt = kernel_matrix(t, t, kernel, **kernel_params)
    if normalize_rows:
        ks = torch.nn.functional.normalize(ks, dim=1)
        kt = torch.nn.functional.normalize(kt, dim=1)
    return (ks - kt).pow(2).mean()


def mmd_loss_reference(s, t, kernel="polynomial", **kernel_params):
    """Squared kernel MMD ``mean k(s,s') + mean k(t,t') − 2 mean k(s,t)`` (NST, Huang & Wang 2017).

    For rbf without an explicit σ² (Chebyshev without a scale), one value computed from both sets
    together serves all three terms, so the same kernel is used throughout.
    """
    t = t.detach()
    if callable(kernel):
        k = functools.partial(kernel_result, kernel)
    else:
        # One kernel for all three terms: data-dependent parameters come from both sets together.
        if kernel == "rbf" and kernel_params.get("sigma2") is None:
            kernel_params = dict(kernel_params, sigma2=rbf_mean_sigma2(torch.cat([s, t])))
        if kernel == "chebyshev" and kernel_params.get("scale") is None:
            scale = torch.cat([s.detach(), t]).abs().amax().clamp(min=torch.finfo(s.dtype).tiny)
            kernel_params = dict(kernel_params, scale=scale)
        def k(a, b):
            return kernel_matrix(a, b, kernel, **kernel_params)
    return k(s, s).mean() + k(t, t).mean() - 2 * k(s, t).mean()


# --- attention transfer (AT) ----------------------------------------------------------------

def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``mean_c |F|^p`` of a (B, C, H, W) feature: the spatial attention map (B, H, W), not normalised."""
    return f.abs().pow(p).mean(1)


def sample_scale(f: torch.Tensor) -> torch.Tensor:
    """Each sample's max ``|f|`` (B,) over every dimension but the batch, detached; 1 for an all-zero
    sample, NaN for a sample holding a NaN (its map is then NaN), inf for one holding an inf."""
    m = f.detach().abs().amax(dim=tuple(range(1, f.dim())))
    return torch.where(m == 0, torch.ones_like(m), m)


def unit_scale(f: torch.Tensor) -> torch.Tensor:
    """``f`` divided by :func:`sample_scale` (the divisor detached). A normalised attention map is
    the same for ``f`` and ``c·f`` (c > 0), so this changes nothing but the range: ``|f|^p`` stays in
    [0, 1] for any ``p`` where it would overflow (or vanish) for large ``p``. The gradient through the
    divisor is exactly 0 (scale invariance), hence detached."""
    if f.dim() < 2 or f.numel() == 0:
        return f
    return f / sample_scale(f).view(-1, *([1] * (f.dim() - 1)))


def unit_attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """:func:`attention_map` of :func:`unit_scale` ``(f)``: what ``distillx::attention_map`` computes."""
    return attention_map(unit_scale(f), p)


def attention_map_loss_reference(f_s, f_t, p=2.0, eps=1e-12):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017): ``mean_{b,k} (a_s − a_t)²``.

    a(F) = L2-normalise(vec(pool(mean_c |F|^p))) per sample; the larger map is adaptive-average-
    pooled to the smaller one's size (after the channel reduction, so channel counts may differ).
    Each sample is computed on F / max|F| (:func:`unit_scale`), so any p > 0 stays finite.
    """
    a_s, a_t = unit_attention_map(f_s, p), unit_attention_map(f_t.detach(), p)
    hs, ws = a_s.shape[-2:]
    ht, wt = a_t.shape[-2:]
    size = (min(hs, ht), min(ws, wt))
    if (hs, ws) != size:
        a_s = torch.nn.functional.adaptive_avg_pool2d(a_s.unsqueeze(1), size).squeeze(1)
    if (ht, wt) != size:
        a_t = torch.nn.functional.adaptive_avg_pool2d(a_t.unsqueeze(1), size).squeeze(1)
    a_s = torch.nn.functional.normalize(a_s.flatten(1), dim=1, eps=eps)
    a_t = torch.nn.functional.normalize(a_t.flatten(1), dim=1, eps=eps)
    return (a_s - a_t).pow(2).mean()


# --- attention relations (MiniLM, MiniLMv2) ---------------------------------------------------

def split_relation_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H) projections → (B, A, L, H/A) relation heads (MiniLMv2), so teacher and student with
    different head counts and widths can be paired with the same A."""
    B, L, H = x.shape
    if H % num_heads:
        raise ValueError(f"hidden width {H} is not divisible by num_heads={num_heads}")
    return x.view(B, L, num_heads, H // num_heads).transpose(1, 2)


def attention_relation_loss_reference(q_s, k_s, q_t, k_t, key_padding_mask=None):
    """MiniLM relation loss: ``Σ KL(softmax(q_t k_tᵀ/√dt) ‖ softmax(q_s k_sᵀ/√ds))`` over valid query
    rows, divided by B·A·(valid rows). Inputs (B, A, L, d); key_padding_mask (B, L) bool, True = real
    token (padded keys get no probability, padded query rows are skipped). Pass k = q for Q-Q / V-V
    self-relations."""
    ds, dt = q_s.shape[-1], q_t.shape[-1]
    acc = torch.float64 if q_s.dtype == torch.float64 else torch.float32
    ls = (q_s.to(acc) @ k_s.to(acc).transpose(-1, -2)) / ds ** 0.5
    lt = (q_t.detach().to(acc) @ k_t.detach().to(acc).transpose(-1, -2)) / dt ** 0.5
    B, A, L, _ = ls.shape
    if key_padding_mask is not None:
        keys = key_padding_mask[:, None, None, :]
        ls = ls.masked_fill(~keys, float("-inf"))
        lt = lt.masked_fill(~keys, float("-inf"))
        rows = key_padding_mask[:, None, :].expand(B, A, L)
    else:
        rows = torch.ones(B, A, L, dtype=torch.bool, device=ls.device)
    lps, lpt = torch.log_softmax(ls, -1), torch.log_softmax(lt, -1)
    pt = lpt.exp()
    kl = torch.where(pt > 0, pt * (lpt - lps), torch.zeros((), dtype=acc, device=ls.device)).sum(-1)
    kl = torch.where(rows, kl, torch.zeros_like(kl))
    valid = rows.sum().clamp(min=1)
    return (kl.sum() / valid).to(q_s.dtype)
