"""MiniLM attention-relation loss: ``distillx::attention_relation`` (C++: csrc/cpu/relation_cpu.cpp)
computes the loss over query-row blocks, never an (L, L) matrix, with the gradient for q_s and k_s
in the same pass; backward scales it by the upstream scalar."""
from __future__ import annotations

import torch

from . import has_kernel
from . import reference as ref

if has_kernel("attention_relation", "cpu") or has_kernel("attention_relation", "cuda"):

    @torch.library.register_fake("distillx::attention_relation")
    def _relation_fake(q_s, k_s, q_t, k_t, key_padding_mask, compute_grad):
        if compute_grad:
            return q_s.new_empty(()), q_s.new_empty(q_s.shape), q_s.new_empty(k_s.shape)
        return q_s.new_empty(()), q_s.new_empty((0,)), q_s.new_empty((0,))

    def _setup(ctx, inputs, output):
        ctx.compute_grad = inputs[5]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])
        ctx._materialize_non_diff_grads = False  # see ops/logit_divergence.py

    def _backward(ctx, grad_loss, *_):
        if grad_loss is None:
            return (None,) * 6
        if not ctx.compute_grad:
            raise RuntimeError("distillx::attention_relation was called with compute_grad=False; call it with "
                               "compute_grad=True to differentiate it")
        gq, gk = ctx.saved_tensors
        return gq * grad_loss, gk * grad_loss, None, None, None, None

    torch.library.register_autograd("distillx::attention_relation", _backward, setup_context=_setup)


def attention_relation_loss(q_s, k_s, q_t, k_t, key_padding_mask):
    if not has_kernel("attention_relation", q_s.device.type):
        return ref.attention_relation_loss_reference(q_s, k_s, q_t, k_t, key_padding_mask)
    acc = torch.float64 if q_s.dtype == torch.float64 else torch.float32
    qs, ks = q_s.to(acc), k_s.to(acc)
    compute_grad = torch.is_grad_enabled() and (qs.requires_grad or ks.requires_grad)
    loss, _, _ = torch.ops.distillx.attention_relation(qs, ks, q_t.to(acc), k_t.to(acc), key_padding_mask,
                                                        compute_grad)
    return loss.to(q_s.dtype)
