"""Logit divergence (Hinton KD, reverse KL, generalised JSD): ``distillx::logit_divergence``.

C++: ``csrc/cpu/logit_divergence.cpp``, ``csrc/cuda/logit_divergence.cu``, host code in
``csrc/include/distillx/logit_divergence.h``. The kernel computes each row's gradient in the same
pass as its loss (a row's gradient needs only that row), so backward scales what forward produced
by the per-row upstream gradient; without ``compute_grad`` backward recomputes it with the upstream
gradient folded into the row weights.
"""
from __future__ import annotations

import torch

from . import reference as ref
from ._library import DIVERGENCE_CODES, acc_dtype, non_differentiable, reduce_total, register, use_kernel

OP = "logit_divergence"


def _fake(student, teacher, row_weight, temperature, divergence, beta, compute_grad):
    rows = student.new_empty((student.shape[0],), dtype=acc_dtype(student.dtype))
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty((0,))
    return rows, grad


def _setup(ctx, inputs, output):
    student, teacher, row_weight, temperature, divergence, beta, compute_grad = inputs
    ctx.compute_grad = compute_grad
    ctx.set_materialize_grads(False)
    if compute_grad:
        ctx.save_for_backward(output[1])
    else:
        ctx.save_for_backward(student, teacher, row_weight)
        ctx.params = (temperature, divergence, beta)
    non_differentiable(ctx, output[1])


def _backward(ctx, grad_rows, _grad_of_grad):
    if grad_rows is None:
        return (None,) * 7
    if not ctx.compute_grad:
        # Forward kept no gradient: recompute it with the upstream gradient folded into the weights.
        student, teacher, row_weight = ctx.saved_tensors
        weight = grad_rows if row_weight is None else grad_rows * row_weight
        _, grad = torch.ops.distillx.logit_divergence(student, teacher, weight, *ctx.params, True)
        return grad, None, None, None, None, None, None
    (grad,) = ctx.saved_tensors
    scale = grad_rows.unsqueeze(1).to(grad.dtype)
    if _graph_is_freed_after_this_backward() and type(grad) is torch.Tensor:
        # The saved gradient is ours alone and dies with the graph: scale it in place rather than
        # allocate (and page-fault) another (N, C) tensor; that keeps peak memory at one gradient.
        return grad.mul_(scale), None, None, None, None, None, None
    # retain_graph/create_graph (e.g. gradcheck), or traced by torch.compile: stay functional.
    return grad * scale, None, None, None, None, None, None


def _graph_is_freed_after_this_backward() -> bool:
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()


register(OP, _fake, _backward, _setup)


def kd_loss(s, t, temperature, divergence, beta, reduction, mask):
    """:func:`distillx.functional.kd_loss` on validated inputs: ``s``/``t`` (..., C) of one dtype,
    ``t`` detached, ``mask`` None or bool (N,)."""
    if not use_kernel(OP, s.device):
        return ref.kd_loss_reference(s, t, temperature, divergence, beta, reduction, mask=mask)
    rows_shape, C = tuple(s.shape[:-1]), s.shape[-1]
    s2, t2 = s.reshape(-1, C), t.reshape(-1, C)
    weight = None if mask is None else mask.to(acc_dtype(s.dtype))
    compute_grad = torch.is_grad_enabled() and s.requires_grad
    rows, _ = torch.ops.distillx.logit_divergence(s2, t2, weight, float(temperature), DIVERGENCE_CODES[divergence],
                                                  float(beta), compute_grad)
    if reduction == "none":
        return rows.reshape(rows_shape).to(s.dtype)
    kept = float(s2.shape[0]) if mask is None else weight.sum()
    return reduce_total(rows.sum(), kept, reduction, C).to(s.dtype)
