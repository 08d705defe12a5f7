"""Fake kernel and autograd of ``distillx::kernel_gram`` (C++: csrc/include/distillx/gram_panels.h).

The op returns the loss and, in the same pass, its gradient w.r.t. the student rows; backward only
scales that gradient by the upstream scalar.
"""
from __future__ import annotations

import torch


@torch.library.register_fake("distillx::kernel_gram")
def _kernel_gram_fake(s, t, kernel, s_params, t_params, panel_rows, compute_grad):
    grad = s.new_empty(s.shape) if compute_grad else s.new_empty((0,))
    return s.new_empty(()), grad


def _setup(ctx, inputs, output):
    ctx.compute_grad = inputs[6]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx._materialize_non_diff_grads = False  # see ops/logit_divergence.py


def _backward(ctx, grad_loss, _):
    if grad_loss is None:
        return (None,) * 7
    if not ctx.compute_grad:
        raise RuntimeError("distillx::kernel_gram was called with compute_grad=False; call it with "
                           "compute_grad=True to differentiate it")
    (grad,) = ctx.saved_tensors
    return grad * grad_loss, None, None, None, None, None, None


torch.library.register_autograd("distillx::kernel_gram", _backward, setup_context=_setup)


@torch.library.register_fake("distillx::kernel_mmd")
def _kernel_mmd_fake(x, weights, kernel, params, panel_rows, compute_grad):
    grad = x.new_empty(x.shape) if compute_grad else x.new_empty((0,))
    return x.new_empty(()), grad


def _mmd_setup(ctx, inputs, output):
    ctx.compute_grad = inputs[5]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    ctx._materialize_non_diff_grads = False  # see ops/logit_divergence.py


def _mmd_backward(ctx, grad_loss, _):
    if grad_loss is None:
        return (None,) * 6
    if not ctx.compute_grad:
        raise RuntimeError("distillx::kernel_mmd was called with compute_grad=False; call it with "
                           "compute_grad=True to differentiate it")
    (grad,) = ctx.saved_tensors
    return grad * grad_loss, None, None, None, None, None


torch.library.register_autograd("distillx::kernel_mmd", _mmd_backward, setup_context=_mmd_setup)
