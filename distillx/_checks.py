"""Argument validation shared by the user-facing API: every error names the argument and what was expected."""
from __future__ import annotations

import math
from numbers import Real
from typing import Iterable

import torch


def floating_tensor(name: str, x, *, min_dim: int = 1) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float64, bfloat16 or float16), got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def same_device(**tensors) -> None:
    """All given tensors on one device (non-tensors are skipped: their own checks name them)."""
    named = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    if not named:
        return
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; put them on one device")


def choice(name: str, value, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def unit_interval(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def row_mask(mask, rows_shape: tuple, *, name: str = "mask") -> torch.Tensor:
    """A bool mask of shape ``rows_shape`` (the logits' leading dims) or flattened to (N,); returns (N,)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True keeps a row), got {mask.dtype}")
    n = math.prod(rows_shape)
    if tuple(mask.shape) != tuple(rows_shape) and tuple(mask.shape) != (n,):
        raise ValueError(f"{name} must have shape {tuple(rows_shape)} (one entry per row), got {tuple(mask.shape)}")
    return mask.reshape(n)
