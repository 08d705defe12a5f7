"""Pure-PyTorch references of every distillx op.

They define the semantics the compiled kernels must reproduce, serve as the fallback when
``distillx._C`` is missing, and are the "eager PyTorch" column of ``distillx bench``. They favour
clarity and exactness over speed and memory (they materialise full (N, C) tensors).
"""
from __future__ import annotations

import torch

DIVERGENCES = ("kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _xlogy_diff(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``w * (a - b)`` with the convention ``0 * anything = 0`` (so 0·log 0 = 0 and -inf logits are allowed)."""
    return torch.where(w > 0, w * (a - b), torch.zeros((), dtype=w.dtype, device=w.device))


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
        lm = torch.log(beta * p + (1.0 - beta) * q)
        terms = beta * _xlogy_diff(p, lp, lm) + (1.0 - beta) * _xlogy_diff(q, lq, lm)
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
    s = torch.nn.functional.linear(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        t = torch.nn.functional.linear(teacher_hidden, teacher_weight, teacher_bias)
    return kd_loss_reference(s, t, temperature, divergence, beta, reduction, mask)
