"""Python side of the logit-divergence family: fake kernels and autograd of
``distillx::logit_divergence`` and ``distillx::linear_divergence`` (C++ in csrc/cpu/divergence_cpu.cpp).

Both kernels compute the gradient in the same pass as the loss (every loss is a sum of row terms
whose gradient needs only that row), so backward only scales what forward produced: by the per-row
upstream gradient for logits, by the scalar upstream gradient for the fused linear op. When the
forward ran without ``compute_grad`` (reduction "none" of the linear op), backward recomputes the
chunks with the upstream gradient folded into the row weights.
"""
from __future__ import annotations

import torch

from .scalar_loss import non_differentiable

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("distillx::logit_divergence")
def _logit_divergence_fake(student, teacher, row_weight, temperature, divergence, beta, compute_grad):
    rows = student.new_empty((student.shape[0],), dtype=_acc_dtype(student.dtype))
    grad = student.new_empty(student.shape) if compute_grad else student.new_empty((0,))
    return rows, grad


def _logit_setup(ctx, inputs, output):
    student, teacher, row_weight, temperature, divergence, beta, compute_grad = inputs
    ctx.compute_grad = compute_grad
    ctx.set_materialize_grads(False)
    if compute_grad:
        ctx.save_for_backward(output[1])
    else:
        ctx.save_for_backward(student, teacher, row_weight)
        ctx.params = (temperature, divergence, beta)
    non_differentiable(ctx, output[1])


def _logit_backward(ctx, grad_rows, _grad_of_grad):
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


torch.library.register_autograd("distillx::logit_divergence", _logit_backward, setup_context=_logit_setup)


@torch.library.register_fake("distillx::linear_divergence")
def _linear_divergence_fake(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                            teacher_bias, row_weight, temperature, divergence, beta, chunk_size, compute_grad):
    acc = _acc_dtype(student_hidden.dtype)
    total = student_hidden.new_empty((), dtype=acc)
    rows = student_hidden.new_empty((student_hidden.shape[0],), dtype=acc)
    if not compute_grad:
        return total, rows, *(student_hidden.new_empty((0,)) for _ in range(3))
    g_bias = student_hidden.new_empty(student_bias.shape if student_bias is not None else (0,))
    return (total, rows, student_hidden.new_empty(student_hidden.shape),
            student_hidden.new_empty(student_weight.shape), g_bias)


def _linear_setup(ctx, inputs, output):
    hs, ws, bs, ht, wt, bt, row_weight, temperature, divergence, beta, chunk_size, compute_grad = inputs
    ctx.compute_grad = compute_grad
    ctx.has_bias = bs is not None
    ctx.params = (temperature, divergence, beta, chunk_size)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hs, ws, bs, ht, wt, bt, row_weight, *(output[2:] if compute_grad else ()))
    non_differentiable(ctx, *output[2:])


def _linear_backward(ctx, grad_total, grad_rows, *_):
    hs, ws, bs, ht, wt, bt, row_weight, *saved = ctx.saved_tensors
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


torch.library.register_autograd("distillx::linear_divergence", _linear_backward, setup_context=_linear_setup)
