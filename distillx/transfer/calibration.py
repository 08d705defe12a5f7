"""Calibration data for the strategies that look at data (``head_fit``, ``layer_map(map="auto")``,
``prune``): how batches are taken, run through a model, and what output is compared.

A calibration batch is a tensor, an ``(inputs, targets, ...)`` tuple (``inputs`` may be a dict of
keyword arguments) or a dict of keyword arguments (a tokenizer's output; its ``"labels"`` are not
passed to the model). A single tensor or dict given as ``calibration`` is one batch.
"""
from __future__ import annotations

import inspect
import itertools
from collections.abc import Mapping
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .. import _checks
from .._batch import attention_mask_of
from ..reporting.progress import ProgressBar
from .errors import TransferError


def model_device(model: nn.Module) -> Optional[torch.device]:
    """The device of the model's first parameter (else buffer); None for a model without tensors."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return None if tensor is None else tensor.device


def to_device(value: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def inputs_of(batch: Any, who: str) -> Any:
    """The model inputs of a calibration batch (see the module docstring)."""
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise TransferError(f"{who}: a calibration batch is an empty tuple")
        batch = batch[0]
    return batch


def model_inputs(batch: Any, who: str) -> Any:
    """:func:`inputs_of`, a mapping without its ``"labels"`` (they are targets, not inputs)."""
    inputs = inputs_of(batch, who)
    return {k: v for k, v in inputs.items() if k != "labels"} if isinstance(inputs, Mapping) else inputs


def call(model: nn.Module, batch: Any, who: str) -> Any:
    """Run ``model`` on a calibration batch's :func:`model_inputs` (moved to its device); a mapping
    is passed as keyword arguments (without keys the forward does not take, when it takes no
    ``**kwargs``)."""
    kwargs = to_device(model_inputs(batch, who), model_device(model))
    if not isinstance(kwargs, Mapping):
        return model(kwargs)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return model(**kwargs)
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return model(**kwargs)


def batches(calibration: Any, who: str, max_batches: Optional[int] = None, *, progress: bool = False
            ) -> Iterator[Any]:
    """Iterate the calibration batches (at most ``max_batches``), with a progress bar (auto: on a TTY)
    when ``progress``. Raises :class:`TransferError` when ``calibration`` is None and TypeError when
    it is not iterable; the caller checks that a batch came."""
    if calibration is None:
        raise TransferError(f"{who} needs calibration=: an iterable of batches (a DataLoader, a list of "
                            "(inputs, targets) or of input tensors, or tokenizer outputs)")
    if isinstance(calibration, (torch.Tensor, Mapping)):
        calibration = [calibration]  # one batch (a tensor, a tokenizer's output), not its rows or keys
    if isinstance(calibration, (str, bytes)):  # iterable, but of characters
        raise TypeError(f"{who}: calibration must be an iterable of batches, got a {type(calibration).__name__}")
    try:
        iterator = iter(calibration)
    except TypeError:
        raise TypeError(f"{who}: calibration must be an iterable of batches, got {type(calibration).__name__}") \
            from None
    total = None
    if max_batches is not None:
        _checks.integer(f"{who}: max_batches", max_batches, ge=1, optional=True)
        # islice stops before pulling batch max_batches + 1 (a loader may be expensive or endless)
        iterator = itertools.islice(iterator, max_batches)
        total = max_batches
    if not progress:
        return iterator
    try:
        total = min(total, len(calibration)) if total is not None else len(calibration)
    except TypeError:
        pass
    return _with_bar(iterator, total, f"{who} calibration")


def _with_bar(iterator: Iterator[Any], total: Optional[int], desc: str) -> Iterator[Any]:
    with ProgressBar(total, desc) as bar:
        for batch in iterator:
            yield batch
            bar.update(_rows(batch))


def _rows(batch: Any) -> int:
    x = inputs_of(batch, "calibration") if isinstance(batch, (list, tuple)) and batch else batch
    if isinstance(x, Mapping):
        x = next((v for v in x.values() if isinstance(v, torch.Tensor)), None)
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 1


def token_mask(batch: Any) -> Optional[torch.Tensor]:
    """The batch's attention mask (True = real token), or None."""
    inputs = inputs_of(batch, "calibration") if isinstance(batch, (list, tuple)) and batch else batch
    return attention_mask_of(inputs)


def require_rows(seen: int, who: str) -> None:
    if seen == 0:
        raise TransferError(f"{who}: the calibration data yielded no batches (an empty loader?): there is nothing "
                            "to measure")
