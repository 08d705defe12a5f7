"""User-facing distillation losses.

Each function validates its arguments, then calls the fused ``distillx::*`` operator when the compiled
core serves the inputs' device, else the pure-PyTorch reference in :mod:`distillx.ops.reference`
(warning once). All are differentiable w.r.t. the student side only: teacher inputs are constants.
"""
from __future__ import annotations

import warnings

import torch

from . import _checks, _ext
from .ops import DIVERGENCE_CODES, backend
from .ops import reference as ref
from .ops.reference import DIVERGENCES, REDUCTIONS

_FALLBACK_WARNED: set = set()


def _use_kernel(op: str, device: torch.device) -> bool:
    if backend(op, device.type) == "compiled":
        return True
    if not _ext.available():
        _ext.warn_missing_once()
    elif (op, device.type) not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add((op, device.type))
        warnings.warn(f"distillx::{op} has no compiled kernel for {device.type}; running the reference",
                      RuntimeWarning, stacklevel=3)
    return False


def _check_divergence_options(temperature, divergence, beta, reduction):
    _checks.positive("temperature", temperature)
    _checks.choice("divergence", divergence, DIVERGENCES)
    _checks.unit_interval("beta", beta)
    _checks.choice("reduction", reduction, REDUCTIONS)


def _reduce(total: torch.Tensor, kept: torch.Tensor | float, reduction: str, num_classes: int) -> torch.Tensor:
    """Turn the sum of kept row losses into the requested scalar reduction (0 when no row is kept)."""
    if reduction == "sum":
        return total
    denom = kept * num_classes if reduction == "mean" else kept
    if isinstance(denom, torch.Tensor):
        return total / denom.clamp(min=1)
    return total / max(denom, 1)


def kd_loss(student_logits, teacher_logits, temperature=1.0, divergence="kl", beta=0.5, reduction="batchmean",
            mask=None):
    r"""Logit distillation loss between student and teacher distributions (Hinton et al., 2015).

    With p = softmax(teacher/T) and q = softmax(student/T), per row:

    * ``"kl"`` (forward KL): :math:`T^2\,\mathrm{KL}(p\|q) = T^2 \sum_c p_c(\log p_c - \log q_c)`
    * ``"reverse_kl"``: :math:`T^2\,\mathrm{KL}(q\|p)` (mode-seeking; MiniLLM, Gu et al., 2024)
    * ``"jsd"``: :math:`T^2[\beta\,\mathrm{KL}(p\|m) + (1-\beta)\,\mathrm{KL}(q\|m)]`, m = βp + (1−β)q
      (generalised JSD, GKD, Agarwal et al., 2024; β = 0.5 is the symmetric Jensen–Shannon
      divergence; β = 0 and β = 1 make it identically 0 — use "kl"/"reverse_kl" for those limits).

    Args:
        student_logits: (..., C) float tensor; leading dims are flattened to rows.
        teacher_logits: same shape; treated as a constant (no gradient flows to it). A different
            floating dtype is converted to the student's.
        temperature: T > 0; the loss is scaled by T² so gradient magnitudes do not depend on T.
        divergence: "kl", "reverse_kl" or "jsd".
        beta: JSD mixing weight in [0, 1].
        reduction: "batchmean" (sum over kept rows / number of kept rows), "sum", "mean"
            (/ kept rows·C, like ``F.kl_div(reduction="mean")``) or "none" (per-row, shape (...)).
        mask: optional bool tensor of shape (...) (or (N,)); False drops a row. With every row
            dropped the loss is 0 with a zero gradient.

    ``-inf`` logits (masked vocabulary) are allowed where the other side's probability is 0 too
    (0·log 0 = 0). The loss is returned in the student's dtype; internal math is float32 (float64
    for float64 inputs).

    Example::

        loss = distillx.functional.kd_loss(student(x), teacher(x).detach(), temperature=4.0)
    """
    s = _checks.floating_tensor("student_logits", student_logits)
    t = _checks.floating_tensor("teacher_logits", teacher_logits)
    if s.shape != t.shape:
        raise ValueError(f"teacher_logits shape {tuple(t.shape)} must match student_logits shape {tuple(s.shape)}")
    _checks.same_device(student_logits=s, teacher_logits=t, mask=mask)
    _check_divergence_options(temperature, divergence, beta, reduction)
    rows_shape, C = tuple(s.shape[:-1]), s.shape[-1]
    m = None if mask is None else _checks.row_mask(mask, rows_shape)
    t = t.detach()
    if t.dtype != s.dtype:
        t = t.to(s.dtype)
    if not _use_kernel("logit_divergence", s.device):
        return ref.kd_loss_reference(s, t, temperature, divergence, beta, reduction, mask=m)

    s2, t2 = s.reshape(-1, C), t.reshape(-1, C)
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    weight = None if m is None else m.to(acc)
    compute_grad = torch.is_grad_enabled() and s.requires_grad
    rows, _ = torch.ops.distillx.logit_divergence(s2, t2, weight, float(temperature),
                                                  DIVERGENCE_CODES[divergence], float(beta), compute_grad)
    if reduction == "none":
        return rows.reshape(rows_shape).to(s.dtype)
    kept = float(s2.shape[0]) if m is None else weight.sum()
    return _reduce(rows.sum(), kept, reduction, C).to(s.dtype)


def linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=None,
                   teacher_bias=None, temperature=1.0, divergence="kl", beta=0.5, reduction="batchmean", mask=None,
                   chunk_size=None):
    r""":func:`kd_loss` on the logits of two linear output layers, without materialising them.

    Computes ``kd_loss(student_hidden @ student_weight.T + student_bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, ...)`` in chunks of rows, so memory is
    O(chunk_size·C) instead of O(N·C) — the LM-head case where C is a vocabulary (Liger-Kernel's
    fused linear losses do the same for cross-entropy/JSD). Gradients flow to ``student_hidden``,
    ``student_weight`` and ``student_bias``; the teacher side is constant.

    Args:
        student_hidden: (..., Hs); student_weight: (C, Hs); student_bias: (C,) or None.
        teacher_hidden: (..., Ht) with the same leading dims; teacher_weight: (C, Ht); teacher_bias: (C,) or None.
        chunk_size: rows per chunk; None picks about 8M logits per chunk.
        temperature, divergence, beta, reduction, mask: as in :func:`kd_loss`.

    Example::

        loss = linear_kd_loss(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, temperature=2.0)
    """
    hs = _checks.floating_tensor("student_hidden", student_hidden)
    ht = _checks.floating_tensor("teacher_hidden", teacher_hidden)
    ws = _checks.floating_tensor("student_weight", student_weight, min_dim=2)
    wt = _checks.floating_tensor("teacher_weight", teacher_weight, min_dim=2)
    for name, w, h in (("student_weight", ws, hs), ("teacher_weight", wt, ht)):
        if w.dim() != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(f"{name} must have shape (C, {h.shape[-1]}) to match the hidden width, got {tuple(w.shape)}")
    if wt.shape[0] != ws.shape[0]:
        raise ValueError(f"teacher_weight has {wt.shape[0]} classes but student_weight has {ws.shape[0]}; they must agree")
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(f"teacher_hidden leading shape {tuple(ht.shape[:-1])} must match student_hidden's {tuple(hs.shape[:-1])}")
    C = ws.shape[0]
    for name, b, w in (("student_bias", student_bias, ws), ("teacher_bias", teacher_bias, wt)):
        if b is not None:
            _checks.floating_tensor(name, b)
            if tuple(b.shape) != (C,):
                raise ValueError(f"{name} must have shape ({C},), got {tuple(b.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    _checks.same_device(student_hidden=hs, student_weight=ws, student_bias=student_bias, teacher_hidden=ht,
                        teacher_weight=wt, teacher_bias=teacher_bias, mask=mask)
    _check_divergence_options(temperature, divergence, beta, reduction)
    rows_shape = tuple(hs.shape[:-1])
    m = None if mask is None else _checks.row_mask(mask, rows_shape)
    dtype = hs.dtype
    ws, bs = ws.to(dtype), None if student_bias is None else student_bias.to(dtype)
    ht, wt = ht.detach(), wt.detach()
    bt = None if teacher_bias is None else teacher_bias.detach().to(wt.dtype)
    ht = ht.to(wt.dtype)
    if not _use_kernel("linear_divergence", hs.device):
        return ref.linear_kd_loss_reference(hs, ws, ht, wt, bs, bt, temperature, divergence, beta, reduction, m)

    hs2, ht2 = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = None if m is None else m.to(acc)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hs, ws, bs))
    # Gradients fold into the forward pass only for scalar reductions; "none" recomputes in backward.
    compute_grad = needs_grad and reduction != "none"
    total, rows, *_ = torch.ops.distillx.linear_divergence(
        hs2, ws, bs, ht2, wt, bt, weight, float(temperature), DIVERGENCE_CODES[divergence], float(beta),
        int(chunk_size or 0), compute_grad)
    if reduction == "none":
        return rows.reshape(rows_shape).to(dtype)
    kept = float(hs2.shape[0]) if m is None else weight.sum()
    return _reduce(total, kept, reduction, C).to(dtype)
