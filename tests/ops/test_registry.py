"""Every ``distillx::*`` schema of the compiled core has a Python side and is served by its kernel.

The op list is read from PyTorch's dispatcher, so an op added to ``csrc/distillx.cpp`` shows up here
without anyone updating a list: it fails until its family registers a fake kernel and autograd, a
sample call is added below, and the user-facing function reaches the kernel wherever the build has
one (a TorchDispatchMode records which ``distillx::`` ops a call and its backward dispatched).
Under ``DISTILLX_REQUIRE_COMPILED=1`` (``make test``, CI) every op must have a CPU kernel.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import distillx.functional as DF
from distillx import _ext
from distillx.ops import has_kernel, library_ops, missing_python_side
from distillx.ops import attention_relation as relation_ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _leaf(*shape, device):
    return torch.randn(*shape, device=device, requires_grad=True)


# op -> a user-facing call (forward and backward) that must reach it. Backward ops are reached by the
# backward of their forward op's call.
def _kd(device):
    return DF.kd_loss(_leaf(4, 7, device=device), torch.randn(4, 7, device=device), temperature=2.0)


def _linear_kd(device):
    return DF.linear_kd_loss(_leaf(4, 3, device=device), _leaf(7, 3, device=device), torch.randn(4, 5, device=device),
                             torch.randn(7, 5, device=device))


def _gram(device):
    return DF.kernel_gram_loss(_leaf(16, 3, device=device), torch.randn(16, 5, device=device), kernel="rbf")


def _mmd(device):
    return DF.mmd_loss(_leaf(6, 4, device=device), torch.randn(5, 4, device=device), kernel="rbf")


def _attention_map(device):
    return DF.attention_map_loss(_leaf(2, 3, 4, 4, device=device), torch.randn(2, 5, 4, 4, device=device))


def _relation(device):
    q, k = _leaf(2, 2, 5, 4, device=device), _leaf(2, 2, 5, 4, device=device)
    return DF.attention_relation_loss(q, k, torch.randn(2, 2, 5, 6, device=device), torch.randn(2, 2, 5, 6, device=device))


def _relation_pair(device):
    """The flash-style pair, which serves sequences longer than the fused op's limit (here: all)."""
    limit = relation_ops.FUSED_MAX_L
    relation_ops.FUSED_MAX_L = 0
    try:
        return _relation(device)
    finally:
        relation_ops.FUSED_MAX_L = limit


SAMPLE_CALLS = {
    "logit_divergence": _kd,
    "linear_divergence": _linear_kd,
    "kernel_gram": _gram,
    "kernel_mmd": _mmd,
    "attention_map": _attention_map,
    "attention_map_backward": _attention_map,
    "attention_relation": _relation_pair,
    "attention_relation_backward": _relation_pair,
    "attention_relation_fused": _relation,
}


class Dispatched(TorchDispatchMode):
    """Records the ``distillx::`` ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("distillx::"):
            self.ops.add(name.split("::")[1].split(".")[0])
        return func(*args, **(kwargs or {}))


def dispatched(call, device) -> set[str]:
    with Dispatched() as mode:
        call(device).backward()
    return mode.ops


pytestmark = pytest.mark.skipif(not _ext.available(), reason="distillx._C not built: no schemas to check")


def test_the_library_defines_ops():
    assert "logit_divergence" in library_ops()  # the dispatcher query itself works


def test_every_schema_has_a_python_side():
    assert missing_python_side() == [], "register a fake kernel and autograd in distillx/ops/<family>.py"


def test_every_schema_has_a_sample_call():
    missing = sorted(set(library_ops()) - set(SAMPLE_CALLS))
    assert not missing, f"add a sample call for {missing} to SAMPLE_CALLS"


@pytest.mark.skipif(os.environ.get("DISTILLX_REQUIRE_COMPILED") != "1", reason="DISTILLX_REQUIRE_COMPILED is not set")
def test_required_build_has_every_cpu_kernel():
    assert [op for op in library_ops() if not has_kernel(op, "cpu")] == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", sorted(SAMPLE_CALLS))
def test_the_user_facing_call_reaches_the_kernel(op, device):
    if op not in library_ops() or not has_kernel(op, device):
        pytest.skip(f"this build has no {device} kernel for distillx::{op}")
    assert op in dispatched(SAMPLE_CALLS[op], device), f"{op} on {device} was served by the reference"


def test_a_reference_path_is_detected(monkeypatch):
    # The check above can fail: with the kernel table emptied, the same calls reach no distillx:: op.
    from distillx.ops import _library

    monkeypatch.setattr(_library, "_KERNELS", {})
    monkeypatch.setattr(_library, "_FALLBACK_WARNED", {(op, "cpu") for op in library_ops()})
    assert dispatched(_kd, "cpu") == set()
