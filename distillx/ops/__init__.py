"""distillx operators: one module per op family (wrapper, fake kernel, autograd), plus references.

Importing this package registers the Python side (fake kernels and autograd formulas) of every op
whose schema the compiled core defines.
"""
from __future__ import annotations

import torch

from .. import _ext

# Every op the compiled core registers, for `distillx info`.
OPS = ("logit_divergence", "linear_divergence", "kernel_gram", "kernel_mmd", "attention_map", "attention_relation")
# Backward ops: served with their forward op; has_kernel answers for them too.
BACKWARD_OPS = ("attention_map_backward", "attention_relation_backward")
# Divergence codes of the C++ kernels (csrc/include/distillx/checks.h).
DIVERGENCE_CODES = {"kl": 0, "reverse_kl": 1, "jsd": 2}


def _kernel_table() -> dict:
    # Looked up once: the dispatcher query is not traceable by torch.compile, a dict lookup is.
    if not _ext.available():
        return {}
    return {(op, dev): torch._C._dispatch_has_kernel_for_dispatch_key(f"distillx::{op}", key)
            for op in OPS + BACKWARD_OPS for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


_KERNELS = _kernel_table()


def has_kernel(op: str, device_type: str) -> bool:
    """True when ``distillx::op`` has a compiled kernel for ``device_type`` ("cpu", "cuda", ...)."""
    return _KERNELS.get((op, device_type), False)


def backend(op: str, device_type: str) -> str:
    """Which implementation serves ``op`` on ``device_type``: "compiled" or "reference"."""
    return "compiled" if has_kernel(op, device_type) else "reference"


if _ext.available():
    from . import attention, gram_op, logit_divergence, relation  # noqa: F401,E402  (register fake kernels + autograd)
