"""Batches as data loaders yield them: split into inputs and targets, moved to a device, and the
logits read from a model's output."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


def split(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch; anything else is a ``TypeError`` saying what came."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError("each batch must be an (inputs, targets) pair, got "
                        + (f"a {type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list))
                           else f"a {type(batch).__name__}"))
    return batch[0], batch[1]


def to_device(x: Any, device: torch.device) -> Any:
    """``x`` on ``device`` when it is a tensor (non-blocking), else unchanged."""
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


def unpack_batch(batch: Any, device: torch.device) -> tuple[Any, Any]:
    """Split a batch into ``(inputs, targets)`` on ``device``."""
    inputs, targets = split(batch)
    return to_device(inputs, device), to_device(targets, device)


def logits_of(output: Any, who: str) -> torch.Tensor:
    """The logits in a model output: a tensor, or a mapping with a ``"logits"`` entry."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    raise TypeError(f"{who} must return a logits tensor or a mapping with a 'logits' tensor, "
                    f"got {type(output).__name__}")


def check_loader(loader: Any, name: str) -> None:
    """Raise unless ``loader`` is iterable and, when it has a length, non-empty."""
    if not isinstance(loader, Iterable):
        raise TypeError(f"{name} must be an iterable of (inputs, targets) batches, got {type(loader).__name__}")
    try:
        empty = len(loader) == 0  # type: ignore[arg-type]
    except TypeError:  # iterable without __len__: emptiness is detected after the first pass
        empty = False
    if empty:
        raise ValueError(f"{name} is empty: it yields no batches")
