"""Logit divergence on two linear output layers, never materialising the (N, C) logits:
``distillx::linear_divergence``.

C++: ``csrc/cpu/linear_divergence.cpp``, ``csrc/cuda/linear_divergence.cu``; the chunk loop is
``csrc/include/distillx/linear_divergence.h`` and the row kernels are the logit-divergence family's.
Rows are processed in chunks: per chunk both logit blocks are GEMMs, the row kernel turns the
student block into ∂loss/∂logits, and GEMMs fold it into the hidden/weight/bias gradients. For scalar
reductions the gradient is computed in the forward pass and backward only scales it; for
``reduction="none"`` backward recomputes the chunks with the upstream gradients folded into the row
weights. A backward with ``create_graph=True`` (second-order gradients) recomputes the gradient with
PyTorch operations on the saved inputs, so autograd can differentiate it again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference as ref
from ._library import (DIVERGENCE_CODES, DIVERGENCE_NAMES, acc_dtype, building_graph, differentiable_grads,
                       non_differentiable, reduce_total, register, use_kernel)

OP = "linear_divergence"


def _fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, row_weight,
          temperature, divergence, beta, chunk_size, compute_grad):
    acc = acc_dtype(student_hidden.dtype)
    total = student_hidden.new_empty((), dtype=acc)
    rows = student_hidden.new_empty((student_hidden.shape[0],), dtype=acc)
    if not compute_grad:
        return total, rows, *(student_hidden.new_empty((0,)) for _ in range(3))
    g_bias = student_hidden.new_empty(student_bias.shape if student_bias is not None else (0,))
    return (total, rows, student_hidden.new_empty(student_hidden.shape),
            student_hidden.new_empty(student_weight.shape), g_bias)


def _setup(ctx, inputs, output):
    hs, ws, bs, ht, wt, bt, row_weight, temperature, divergence, beta, chunk_size, compute_grad = inputs
    ctx.compute_grad = compute_grad
    ctx.has_bias = bs is not None
    ctx.params = (temperature, divergence, beta, chunk_size)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hs, ws, bs, ht, wt, bt, row_weight, *(output[2:] if compute_grad else ()))
    non_differentiable(ctx, *output[2:])


def _reference(hs, ws, bs, ht, wt, bt, row_weight, temperature, divergence, beta):
    """The op's ``(total, rows)`` in PyTorch operations (both logit blocks materialised)."""
    if row_weight is not None:  # a dropped row's hidden state reaches nothing (0 · NaN = NaN otherwise)
        hs = torch.where((row_weight != 0)[:, None], hs, torch.zeros((), dtype=hs.dtype, device=hs.device))
    rows = ref.divergence_rows(F.linear(hs, ws, bs), F.linear(ht, wt, bt), temperature, DIVERGENCE_NAMES[divergence],
                               beta)
    if row_weight is not None:
        rows = rows * row_weight
    return rows.sum(), rows


def _backward(ctx, grad_total, grad_rows, *_):
    hs, ws, bs, ht, wt, bt, row_weight, *saved = ctx.saved_tensors
    if building_graph():  # create_graph=True: a gradient autograd can differentiate again
        wrt = [i for i in range(3) if ctx.needs_input_grad[i]]
        found = differentiable_grads(lambda *x: _reference(*x, *ctx.params[:3]), [hs, ws, bs, ht, wt, bt, row_weight],
                                     wrt, (grad_total, grad_rows))
        grads = [None, None, None]
        for i, g in zip(wrt, found):
            grads[i] = g
        return (*grads, None, None, None, None, None, None, None, None, None)
    grads = [None, None, None]
    if ctx.compute_grad and grad_total is not None:
        # Forward already produced d(total)/dθ: scale it (O(N·H + C·H), no recomputation).
        grads = [g * grad_total.to(g.dtype) for g in saved]
        grad_total = None
    # d(total)/dθ = Σ_i w_i ∂D_i/∂θ and d(rows_i)/dθ = w_i ∂D_i/∂θ: whatever the forward did not
    # produce is recomputed chunk by chunk with the upstream gradients folded into the row weights.
    parts = [g for g in (grad_rows, grad_total) if g is not None]
    if parts:
        weight = (parts[0] if len(parts) == 1 else parts[0] + parts[1]).expand(hs.shape[0])
        if row_weight is not None:
            weight = weight * row_weight
        _, _, *extra = torch.ops.distillx.linear_divergence(hs, ws, bs, ht, wt, bt, weight, *ctx.params, True)
        grads = [e if g is None else g + e for g, e in zip(grads, extra)]
    if not ctx.has_bias:
        grads[2] = None
    return (*grads, None, None, None, None, None, None, None, None, None)


register(OP, _fake, _backward, _setup)


def linear_kd_loss(hs, ws, ht, wt, bs, bt, temperature, divergence, beta, reduction, mask, chunk_size):
    """:func:`distillx.functional.linear_kd_loss` on validated inputs (teacher side detached, in the
    teacher weight's dtype; student weight and bias in the hidden states' dtype)."""
    if not use_kernel(OP, hs.device):
        return ref.linear_kd_loss_reference(hs, ws, ht, wt, bs, bt, temperature, divergence, beta, reduction, mask)
    rows_shape, C, dtype = tuple(hs.shape[:-1]), ws.shape[0], hs.dtype
    hs2, ht2 = hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1])
    weight = None if mask is None else mask.to(acc_dtype(dtype))
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hs, ws, bs))
    # Gradients fold into the forward pass only for scalar reductions; "none" recomputes in backward.
    compute_grad = needs_grad and reduction != "none"
    total, rows, *_ = torch.ops.distillx.linear_divergence(
        hs2, ws, bs, ht2, wt, bt, weight, float(temperature), DIVERGENCE_CODES[divergence], float(beta),
        min(chunk_size, max(hs2.shape[0], 1)) if chunk_size else 0, compute_grad)  # int64-safe: at most N
    if reduction == "none":
        return rows.reshape(rows_shape).to(dtype)
    kept = float(hs2.shape[0]) if mask is None else weight.sum()
    return reduce_total(total, kept, reduction, C).to(dtype)
