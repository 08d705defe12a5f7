"""distillx operators: one module per op family, each the same template (:mod:`distillx.ops._library`):
its ``distillx::*`` schemas' fake kernels and autograd formulas, and wrappers that call the compiled op
or the pure-PyTorch reference (:mod:`distillx.ops.reference`).

=====================  ==========================================================================
``logit_divergence``   forward/reverse KL, generalised JSD of logits (``kd_loss``)
``linear_divergence``  the same on two linear output layers, no (N, C) logits (``linear_kd_loss``)
``kernel_gram``        kernel Gram matching and kernel MMD, no (N, N) (kernels: ``kernel_table``)
``attention_map``      attention transfer's channel reduction and loss
``attention_relation`` MiniLM attention relations, no (L, L)
=====================  ==========================================================================

Importing this package registers the Python side of every op the compiled core defines. This layer
imports nothing of distillx above ``_checks``/``_ext``.
"""
from __future__ import annotations

from . import attention_map, attention_relation, kernel_gram, linear_divergence, logit_divergence  # noqa: F401
from ._library import DIVERGENCE_CODES, backend, has_kernel, library_ops, missing_python_side, registered

__all__ = ["backend", "has_kernel", "library_ops", "registered", "missing_python_side", "DIVERGENCE_CODES",
           "attention_map", "attention_relation", "kernel_gram", "linear_divergence", "logit_divergence"]
