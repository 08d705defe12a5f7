"""MiniLM attention-relation loss: ``distillx::attention_relation`` (C++: csrc/cpu/relation_cpu.cpp)
computes the loss over query-row blocks, never an (L, L) matrix, with the gradient for q_s and k_s
in the same pass; backward scales it by the upstream scalar."""
from __future__ import annotations

import torch

from . import has_kernel
from . import reference as ref
from .scalar_loss import register_scalar_loss

if has_kernel("attention_relation", "cpu") or has_kernel("attention_relation", "cuda"):

    @torch.library.register_fake("distillx::attention_relation")
    def _relation_fake(q_s, k_s, q_t, k_t, key_padding_mask, compute_grad):
        if compute_grad:
            return q_s.new_empty(()), q_s.new_empty(q_s.shape), q_s.new_empty(k_s.shape)
        return q_s.new_empty(()), q_s.new_empty((0,)), q_s.new_empty((0,))

    register_scalar_loss("distillx::attention_relation", num_args=6, grad_args=(0, 1), compute_grad_arg=5)


def attention_relation_loss(q_s, k_s, q_t, k_t, key_padding_mask):
    if not has_kernel("attention_relation", q_s.device.type):
        return ref.attention_relation_loss_reference(q_s, k_s, q_t, k_t, key_padding_mask)
    acc = torch.float64 if q_s.dtype == torch.float64 else torch.float32
    qs, ks = q_s.to(acc), k_s.to(acc)
    compute_grad = torch.is_grad_enabled() and (qs.requires_grad or ks.requires_grad)
    loss, _, _ = torch.ops.distillx.attention_relation(qs, ks, q_t.to(acc), k_t.to(acc), key_padding_mask,
                                                        compute_grad)
    return loss.to(q_s.dtype)
