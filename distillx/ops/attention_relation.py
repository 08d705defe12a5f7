"""MiniLM attention-relation loss: ``distillx::attention_relation`` is flash-attention style: the
forward makes one online-softmax pass over key blocks and keeps only each row's log-sum-exps;
``distillx::attention_relation_backward`` recomputes the score tiles block by block. Neither holds
an (L, L) matrix. A backward with ``create_graph=True`` differentiates the reference instead (it
does hold the (L, L) matrices), so second-order gradients are exact.

Where the device has it (the CPU), ``distillx::attention_relation_fused`` serves sequences up to
:data:`FUSED_MAX_L`: loss and gradient in one pass, each block of query rows meeting all keys at
once (rows × L scores per side, about 1 MB), so the backward only scales the saved gradient, and
the score GEMMs and exps are not done twice. Longer sequences keep the pair above (memory per
thread independent of L).

C++: ``csrc/cpu/attention_relation.cpp``, ``csrc/cuda/attention_relation.cu``, checks in
``csrc/include/distillx/attention_relation.h``.
"""
from __future__ import annotations

import torch

from . import reference as ref
from ._library import (acc_dtype, building_graph, differentiable_grads, has_kernel, register,
                       register_scalar_loss, use_kernel)

OP = "attention_relation"
FUSED = "attention_relation_fused"
# Longest sequence the fused op serves: at 8192 a query block is 32 rows, 2 MB of scores per thread.
FUSED_MAX_L = 8192


def _fake(q_s, k_s, q_t, k_t, key_padding_mask):
    return q_s.new_empty(()), q_s.new_empty((*q_s.shape[:3], 2))


def _backward_fake(grad, q_s, k_s, q_t, k_t, key_padding_mask, stats):
    return q_s.new_empty(q_s.shape), k_s.new_empty(k_s.shape)


def _setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    q_s, k_s, q_t, k_t, mask = inputs
    ctx.save_for_backward(q_s, k_s, q_t, k_t, mask, output[1])


def _backward(ctx, grad_loss, _grad_stats):
    q_s, k_s, q_t, k_t, mask, stats = ctx.saved_tensors
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return None, None, None, None, None
    if building_graph():  # create_graph=True: the same gradient, built from differentiable operations
        wrt = [i for i in (0, 1) if ctx.needs_input_grad[i]]
        found = dict(zip(wrt, differentiable_grads(ref.attention_relation_loss_reference, [q_s, k_s, q_t, k_t, mask],
                                                   wrt, grad_loss)))
        return found.get(0), found.get(1), None, None, None
    gq, gk = torch.ops.distillx.attention_relation_backward(grad_loss, q_s, k_s, q_t, k_t, mask, stats)
    return gq, gk, None, None, None


def _fused_fake(q_s, k_s, q_t, k_t, key_padding_mask, compute_grad):
    if compute_grad:
        return q_s.new_empty(()), q_s.new_empty(q_s.shape), k_s.new_empty(k_s.shape)
    return q_s.new_empty(()), q_s.new_empty((0,)), k_s.new_empty((0,))


def _fused_reference(q_s, k_s, q_t, k_t, key_padding_mask, compute_grad):
    return ref.attention_relation_loss_reference(q_s, k_s, q_t, k_t, key_padding_mask)


register(OP, _fake, _backward, _setup)
register("attention_relation_backward", _backward_fake)
register_scalar_loss(FUSED, _fused_fake, num_args=6, grad_args=(0, 1), compute_grad_arg=5,
                     reference=_fused_reference)


def attention_relation_loss(q_s, k_s, q_t, k_t, key_padding_mask):
    """:func:`distillx.functional.attention_relation_loss` on validated (B, A, L, d) inputs."""
    if not use_kernel(OP, q_s.device):
        return ref.attention_relation_loss_reference(q_s, k_s, q_t, k_t, key_padding_mask)
    acc = acc_dtype(q_s.dtype)
    args = (q_s.to(acc), k_s.to(acc), q_t.to(acc).detach(), k_t.to(acc).detach(), key_padding_mask)
    if q_s.shape[2] <= FUSED_MAX_L and has_kernel(FUSED, q_s.device.type):
        compute_grad = torch.is_grad_enabled() and (q_s.requires_grad or k_s.requires_grad)
        loss = torch.ops.distillx.attention_relation_fused(*args, compute_grad)[0]
    else:
        loss, _ = torch.ops.distillx.attention_relation(*args)
    return loss.to(q_s.dtype)
