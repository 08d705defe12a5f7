"""Argument validation shared by the user-facing API: every error names the argument and what was expected."""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Iterable, Optional

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


def _bounds(gt, ge, lt, le) -> str:
    parts = [f"{op} {b}" for op, b in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if b is not None]
    return " and ".join(parts)


def _within(value, gt, ge, lt, le) -> bool:
    return ((gt is None or value > gt) and (ge is None or value >= ge) and (lt is None or value < lt)
            and (le is None or value <= le))


def number(name: str, value, *, gt=None, ge=None, lt=None, le=None, optional: bool = False) -> Optional[float]:
    """``value`` as a float if it is a finite real number (not a bool) within the bounds (or None when
    ``optional``), else a ``ValueError`` naming ``name``: "``name`` must be a finite number > 0, got -1"."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) \
            or not _within(value, gt, ge, lt, le):
        bounds = _bounds(gt, ge, lt, le)
        what = "a finite number" + (f" {bounds}" if bounds else "") + (" or None" if optional else "")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def integer(name: str, value, *, ge=None, le=None, optional: bool = False) -> Optional[int]:
    """``value`` as an int if it is an integer (not a bool) within the bounds (or None when
    ``optional``), else a ``ValueError`` naming ``name``: "``name`` must be a positive int, got 0"."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or not _within(value, None, ge, None, le):
        bounds = _bounds(None, ge, None, le)
        what = "a positive int" if (ge, le) == (1, None) else "an int" + (f" {bounds}" if bounds else "")
        raise ValueError(f"{name} must be {what}{' or None' if optional else ''}, got {value!r}")
    return int(value)


def boolean(name: str, value) -> bool:
    """``value`` if it is a bool; anything else (``"no"``, 0, None) is a ``TypeError`` naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def positive(name: str, value) -> float:
    return number(name, value, gt=0)


def finite(name: str, value) -> float:
    return number(name, value)


def unit_interval(name: str, value) -> float:
    return number(name, value, ge=0.0, le=1.0)


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
