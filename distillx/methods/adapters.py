"""Learned adapters that map a student feature to the teacher's width (FitNets regressors).

* vectors ``(B, Ds)`` and tokens ``(B, L, Ds)``: :class:`LinearAdapter`, a ``Linear(Ds, Dt)`` on the
  last dim;
* feature maps ``(B, Cs, H, W)``: :class:`ConvAdapter`, a 1×1 ``Conv2d(Cs, Ct, bias=False)``
  followed by ``BatchNorm2d(Ct)`` (as in the FitNets/CRD/mdistiller regressors);
* :class:`nn.Identity` when no adapter is wanted.

:func:`adapter_kind` picks the kind from a feature's shape, :func:`build_adapter` builds one from
widths (eagerly) and :func:`adapter_for` from two observed features (lazily).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _checks

ADAPTERS = ("auto", "linear", "conv", "identity")


class LinearAdapter(nn.Linear):
    """``y = x Wᵀ + b`` on the last dim: ``(B, Ds) -> (B, Dt)``, ``(B, L, Ds) -> (B, L, Dt)``."""


class ConvAdapter(nn.Sequential):
    """1×1 convolution (no bias) + BatchNorm: ``(B, Cs, H, W) -> (B, Ct, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                         nn.BatchNorm2d(out_channels))
        self.in_channels, self.out_channels = in_channels, out_channels


def adapter_kind(feature: torch.Tensor) -> str:
    """``"linear"`` for ``(B, D)``/``(B, L, D)``, ``"conv"`` for ``(B, C, H, W)``; ValueError otherwise."""
    if feature.dim() in (2, 3):
        return "linear"
    if feature.dim() == 4:
        return "conv"
    raise ValueError(f"no adapter for a feature of shape {tuple(feature.shape)}: expected vectors (B, D), "
                     "tokens (B, L, D) or maps (B, C, H, W)")


def feature_width(feature: torch.Tensor, kind: str) -> int:
    """The width an adapter of ``kind`` acts on: the last dim (linear) or the channel dim 1 (conv)."""
    return int(feature.shape[1] if kind == "conv" else feature.shape[-1])


def build_adapter(kind: str, in_width: int, out_width: int, device=None, dtype=None) -> nn.Module:
    """An adapter of ``kind`` ("linear", "conv" or "identity") from ``in_width`` to ``out_width``."""
    for name, width in (("in_width", in_width), ("out_width", out_width)):
        _checks.integer(f"adapter {name}", width, ge=1)
    if kind == "linear":
        return LinearAdapter(in_width, out_width, device=device, dtype=dtype)
    if kind == "conv":
        return ConvAdapter(in_width, out_width).to(device=device, dtype=dtype)
    if kind == "identity":
        if in_width != out_width:
            raise ValueError(f"an identity adapter needs equal widths, got {in_width} -> {out_width}")
        return nn.Identity()
    raise ValueError(f"adapter kind must be one of 'linear', 'conv', 'identity', got {kind!r}")


def adapter_for(student: torch.Tensor, teacher: torch.Tensor, kind: str = "auto") -> nn.Module:
    """An adapter mapping features shaped like ``student`` to the width of ``teacher``.

    ``kind="auto"``: identity when both features have the same width (last dim for vectors and
    tokens, channels for maps), else linear/conv by the student's shape. The adapter is created in float32 (or the feature's float64) on the student's
    device. Raises ValueError when the two shapes cannot be paired (different ranks, or token
    counts that differ).
    """
    if kind not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {kind!r}")
    shape_kind = adapter_kind(student)
    if teacher.dim() != student.dim():
        raise ValueError(f"the student feature {tuple(student.shape)} and the teacher feature "
                         f"{tuple(teacher.shape)} have different ranks")
    if student.dim() == 3 and student.shape[1] != teacher.shape[1]:
        raise ValueError(f"token features need the same length L: student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)}")
    if kind == "auto":
        same = feature_width(student, shape_kind) == feature_width(teacher, shape_kind)
        kind = "identity" if same else shape_kind
    elif kind != "identity" and kind != shape_kind:
        raise ValueError(f"a {kind!r} adapter does not fit a feature of shape {tuple(student.shape)} "
                         f"(use {shape_kind!r})")
    width_kind = shape_kind
    dtype: Optional[torch.dtype] = torch.float64 if student.dtype == torch.float64 else torch.float32
    return build_adapter(kind, feature_width(student, width_kind), feature_width(teacher, width_kind),
                         device=student.device, dtype=dtype)


__all__ = ["ADAPTERS", "LinearAdapter", "ConvAdapter", "adapter_kind", "feature_width", "build_adapter",
           "adapter_for"]
