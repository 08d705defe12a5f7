"""Logit divergence (Hinton KD, reverse KL, generalised JSD): ``distillx::logit_divergence``.

C++: ``csrc/cpu/logit_divergence.cpp``, ``csrc/cuda/logit_divergence.cu``, host code in
``csrc/include/distillx/logit_divergence.h``. The kernel computes each row's gradient in the same
pass as its loss (a row's gradient needs only that row), so backward scales what forward produced
by the per-row upstream gradient; without ``compute_grad`` backward recomputes it with the upstream
gradient folded into the row weights. A backward with ``create_graph=True`` (second-order
gradients) recomputes the gradient with PyTorch operations on the saved logits, so autograd can
differentiate it again; the op keeps references to both logit tensors until backward for that.
"""
from __future__ import annotations

import torch

from . import reference as ref
from ._library import (DIVERGENCE_CODES, DIVERGENCE_NAMES, acc_dtype, building_graph, differentiable_grads,
                       graph_is_freed_after_this_backward, non_differentiable, reduce_total, register,
                       use_kernel)

OP = "logit_divergence"


def _fake(student, teacher, row_weight, temperature, divergence, beta, compute_grad):
    rows = student.new_empty((student.shape[0],), dtype=acc_dtype(student.dtype))
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty((0,))
    return rows, grad


def _setup(ctx, inputs, output):
    student, teacher, row_weight, temperature, divergence, beta, compute_grad = inputs
    ctx.compute_grad = compute_grad
    ctx.set_materialize_grads(False)
    ctx.params = (temperature, divergence, beta)
    # The logits are kept (references, not copies) for a create_graph backward and for compute_grad=False.
    ctx.save_for_backward(student, teacher, row_weight, output[1] if compute_grad else None)
    non_differentiable(ctx, output[1])


def _reference_rows(student, teacher, row_weight, temperature, divergence, beta):
    """The op's per-row losses in PyTorch operations (a dropped row, weight 0, reaches nothing)."""
    if row_weight is not None:
        keep = (row_weight != 0)[:, None]
        zero = torch.zeros((), dtype=student.dtype, device=student.device)
        student, teacher = torch.where(keep, student, zero), torch.where(keep, teacher, zero)
    rows = ref.divergence_rows(student, teacher, temperature, DIVERGENCE_NAMES[divergence], beta)
    return rows if row_weight is None else rows * row_weight


def _backward(ctx, grad_rows, _grad_of_grad):
    if grad_rows is None:
        return (None,) * 7
    student, teacher, row_weight, grad = ctx.saved_tensors
    if building_graph():  # create_graph=True: a gradient autograd can differentiate again
        (grad,) = differentiable_grads(lambda s: _reference_rows(s, teacher, row_weight, *ctx.params), [student],
                                       [0], grad_rows)
        return grad, None, None, None, None, None, None
    if not ctx.compute_grad:
        # Forward kept no gradient: recompute it with the upstream gradient folded into the weights.
        weight = grad_rows if row_weight is None else grad_rows * row_weight
        _, grad = torch.ops.distillx.logit_divergence(student, teacher, weight, *ctx.params, True)
        return grad, None, None, None, None, None, None
    scale = grad_rows.unsqueeze(1).to(grad.dtype)
    if graph_is_freed_after_this_backward() and type(grad) is torch.Tensor:
        # The saved gradient is ours alone and dies with the graph: scale it in place rather than
        # allocate (and page-fault) another (N, C) tensor; that keeps peak memory at one gradient.
        if _uniform_one(grad_rows):
            return grad, None, None, None, None, None, None
        return grad.mul_(scale), None, None, None, None, None, None
    # retain_graph (e.g. gradcheck), or traced by torch.compile: stay functional.
    return grad * scale, None, None, None, None, None, None


def _uniform_one(grad_rows: torch.Tensor) -> bool:
    """True when every row's upstream gradient is exactly 1: ``loss.backward()`` on the sum of the
    rows hands back one broadcast scalar (stride 0). Then the saved gradient already is the answer
    and the (N, C) scaling pass is skipped. CPU only: reading the value on CUDA would synchronise."""
    return (grad_rows.device.type == "cpu" and grad_rows.dim() == 1 and grad_rows.numel() > 0
            and grad_rows.stride(0) == 0 and bool(grad_rows[0] == 1))


register(OP, _fake, _backward, _setup)


def kd_loss(s, t, temperature, divergence, beta, reduction, mask):
    """:func:`distillx.functional.kd_loss` on validated inputs: ``s``/``t`` (..., C) of one dtype,
    ``t`` detached, ``mask`` None or bool (N,)."""
    if not use_kernel(OP, s.device):
        return ref.kd_loss_reference(s, t, temperature, divergence, beta, reduction, mask=mask)
    rows_shape, C = tuple(s.shape[:-1]), s.shape[-1]
    s2, t2 = s.reshape(-1, C), t.reshape(-1, C)
    weight = None if mask is None else mask.to(acc_dtype(s.dtype))
    if reduction != "none":
        # The reduction's 1/kept (or 1/(kept·C)) goes into the row weights, so the loss is the plain
        # sum of the rows: its backward hands every row the same upstream gradient, 1 for
        # loss.backward(), and the gradient the kernel already wrote needs no second (N, C) pass.
        kept = float(s2.shape[0]) if mask is None else weight.sum()
        norm = reduce_total(torch.ones((), dtype=acc_dtype(s.dtype), device=s.device), kept, reduction, C)
        weight = norm.expand(s2.shape[0]) if weight is None else weight * norm
    compute_grad = torch.is_grad_enabled() and s.requires_grad
    rows, _ = torch.ops.distillx.logit_divergence(s2, t2, weight, float(temperature), DIVERGENCE_CODES[divergence],
                                                  float(beta), compute_grad)
    if reduction == "none":
        return rows.reshape(rows_shape).to(s.dtype)
    return rows.sum().to(s.dtype)
