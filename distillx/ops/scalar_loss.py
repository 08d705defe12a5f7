"""Autograd for ops that return a scalar loss together with its gradients.

Every feature loss (kernel_gram, kernel_mmd, attention_relation) is a scalar whose kernel computes
the gradient in the same pass (as Liger-Kernel does), so backward only scales the saved gradients by
the upstream scalar. ``register_scalar_loss`` registers that formula once for all of them.
"""
from __future__ import annotations

from typing import Sequence

import torch


def non_differentiable(ctx, *outputs) -> None:
    """Mark gradient outputs non-differentiable without autograd materialising zero gradients for
    them in backward (for logit_divergence an (N, C) zeros tensor, costlier than the kernel)."""
    ctx.mark_non_differentiable(*outputs)
    ctx._materialize_non_diff_grads = False  # the switch AOTAutograd uses for the same purpose


def register_scalar_loss(op: str, num_args: int, grad_args: Sequence[int], compute_grad_arg: int) -> None:
    """``op`` returns ``(loss, grad_for_args[grad_args[0]], …)`` when its ``compute_grad`` argument
    (position ``compute_grad_arg``) is true; the gradients are w.r.t. the inputs at ``grad_args``."""

    def setup(ctx, inputs, output):
        ctx.compute_grad = inputs[compute_grad_arg]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*output[1:])
        non_differentiable(ctx, *output[1:])

    def backward(ctx, grad_loss, *_):
        grads = [None] * num_args
        if grad_loss is None:
            return tuple(grads)
        if not ctx.compute_grad:
            raise RuntimeError(f"{op} was called with compute_grad=False; call it with compute_grad=True "
                               "to differentiate it")
        for position, grad in zip(grad_args, ctx.saved_tensors):
            grads[position] = grad * grad_loss
        return tuple(grads)

    torch.library.register_autograd(op, backward, setup_context=setup)
