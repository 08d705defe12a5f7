"""What every layer reads from a batch: its attention mask (True = real token) and the errors a
malformed batch raises. The engine (:mod:`distillx.engine.batches`) splits and moves batches; methods
and capture-time reductions only read the mask through :func:`attention_mask_of`."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch


class BatchError(ValueError):
    """A batch does not fit the model: missing keys, a malformed attention mask, an unknown form."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def batch_inputs(batch: Any) -> Any:
    """The model inputs of what a method receives as ``batch``: the first element of an
    ``(inputs, targets)`` pair, or the batch itself."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0]
    return batch


def attention_mask_of(inputs: Any) -> Optional[torch.Tensor]:
    """The ``attention_mask`` of mapping inputs as a (B, L) bool tensor (True = real token), else None.

    ``inputs`` may also be an ``(inputs, targets)`` pair. Raises :class:`BatchError` when the mask is
    not a 2-D tensor or does not match ``input_ids`` in shape.
    """
    inputs = batch_inputs(inputs)
    if not isinstance(inputs, Mapping) or inputs.get("attention_mask") is None:
        return None
    mask = inputs["attention_mask"]
    ids = inputs.get("input_ids")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or (
            isinstance(ids, torch.Tensor) and tuple(ids.shape) != tuple(mask.shape)):
        got = f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else f"a {type(mask).__name__}"
        want = f"{tuple(ids.shape)}, the shape of input_ids" if isinstance(ids, torch.Tensor) else "(batch, tokens)"
        raise BatchError(f"the batch's attention_mask must be a tensor of shape {want}, got {got}")
    return mask if mask.dtype == torch.bool else mask != 0


def check_token_mask(mask: torch.Tensor, shape: tuple, what: str) -> torch.Tensor:
    """``mask`` if it is (B, L) = ``shape``, else :class:`BatchError` naming ``what`` and both shapes."""
    if tuple(mask.shape) != tuple(shape):
        raise BatchError(f"{what}: the attention mask has shape {tuple(mask.shape)} but the tokens are "
                         f"{tuple(shape)} (batch, tokens)")
    return mask
