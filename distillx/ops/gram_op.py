"""Fake kernels and autograd of ``distillx::kernel_gram`` and ``distillx::kernel_mmd`` (C++:
csrc/include/distillx/gram_panels.h). Each returns the loss and, in the same pass, its gradient
w.r.t. the student rows; backward only scales that gradient by the upstream scalar.
"""
from __future__ import annotations

import torch

from .scalar_loss import register_scalar_loss


def _loss_and_grad(x, compute_grad):
    return x.new_empty(()), (x.new_empty(x.shape) if compute_grad else x.new_empty((0,)))


@torch.library.register_fake("distillx::kernel_gram")
def _kernel_gram_fake(s, t, kernel, s_params, t_params, normalize_rows, panel_rows, compute_grad):
    return _loss_and_grad(s, compute_grad)


@torch.library.register_fake("distillx::kernel_mmd")
def _kernel_mmd_fake(s, t, weights, kernel, params, panel_rows, compute_grad):
    return _loss_and_grad(s, compute_grad)


register_scalar_loss("distillx::kernel_gram", num_args=8, grad_args=(0,), compute_grad_arg=7)
register_scalar_loss("distillx::kernel_mmd", num_args=7, grad_args=(0,), compute_grad_arg=6)
