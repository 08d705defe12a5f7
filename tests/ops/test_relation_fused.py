"""distillx::attention_relation_fused, the CPU's one-pass loss and gradient (tests/ops/test_relation.py
runs every agreement test through it and through the flash-style pair): the raw operator, and the
wrapper's choice between the two."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import distillx.functional as DF
from distillx.ops import attention_relation as relation_ops

from .conftest import F64, close, requires_kernel
from .test_relation import _inputs, _run_ref


@requires_kernel
def test_opcheck_attention_relation_fused(rng):
    for dtype, with_mask, compute_grad in ((torch.float32, False, True), (F64, True, True), (F64, True, False)):
        q_s, k_s, q_t, k_t = _inputs(rng, 2, 2, 5, 3, 4, dtype)
        mask = torch.stack([rng.mask(5) for _ in range(2)]) if with_mask else None
        q_s.requires_grad_(compute_grad)
        k_s.requires_grad_(compute_grad)
        torch.library.opcheck(torch.ops.distillx.attention_relation_fused.default,
                              (q_s, k_s, q_t, k_t, mask, compute_grad))


@requires_kernel
def test_raw_fused_op_outputs(rng):
    """The fused op returns the loss and, with compute_grad, ∂loss/∂q_s and ∂loss/∂k_s (unit upstream
    gradient; zero on padded rows), else empty tensors; an element with every token padded adds nothing."""
    B, A, L, ds, dt = 3, 2, 7, 4, 3
    q_s, k_s, q_t, k_t = _inputs(rng, B, A, L, ds, dt, F64)
    mask = torch.stack([rng.mask(L) for _ in range(B)])
    mask[2] = False
    want, (wq, wk) = _run_ref(q_s, k_s, q_t, k_t, mask)
    tag = rng.tag(case="raw attention_relation_fused")
    loss, gq, gk = torch.ops.distillx.attention_relation_fused(q_s, k_s, q_t, k_t, mask, True)
    close(loss, want, F64, tag)
    close(gq, wq, F64, tag)
    close(gk, wk, F64, tag)
    assert not gq[~mask[:, None, :].expand(B, A, L)].any(), "padded query rows get no gradient"
    loss_only, eq, ek = torch.ops.distillx.attention_relation_fused(q_s, k_s, q_t, k_t, mask, False)
    assert loss_only.item() == loss.item() and eq.numel() == 0 and ek.numel() == 0, tag


@requires_kernel
def test_the_wrapper_picks_the_fused_op_up_to_its_limit(rng, monkeypatch):
    """Sequences up to FUSED_MAX_L take the fused op where the device has it, longer ones the pair."""

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.name().split("::")[-1].split(".")[0])
            return func(*args, **(kwargs or {}))

    q_s, k_s, q_t, k_t = _inputs(rng, 1, 2, 6, 4, 3, torch.float32)
    q_s.requires_grad_(True)
    for limit, want in ((6, {"attention_relation_fused"}), (5, {"attention_relation", "attention_relation_backward"})):
        monkeypatch.setattr(relation_ops, "FUSED_MAX_L", limit)
        seen: set = set()
        with Ops():
            DF.attention_relation_loss(q_s, k_s, q_t, k_t).backward()
        assert want <= seen and not ({"attention_relation_fused", "attention_relation"} - want) & seen, (limit, seen)
