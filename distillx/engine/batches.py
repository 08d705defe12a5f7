"""Batches as data loaders yield them, and models called with them.

A batch is one of

- an ``(inputs, targets)`` pair, whose ``inputs`` is a tensor (``model(inputs)``), a tuple
  (``model(*inputs)``) or a mapping (``model(**inputs)``);
- a mapping, what tokenizers, Hugging Face ``DataCollator``\\s and ``datasets`` yield: the model gets
  ``model(**inputs)`` with the keys its ``forward`` accepts, and the targets are ``batch["labels"]``
  (the label key is configurable; a mapping without it has no targets, ``None``).

Tensors are moved to the device recursively (mappings, tuples, lists). A model's output is a
tensor, a tuple (its first element) or a mapping / ``ModelOutput`` with ``logits``; a model without
logits (an encoder) gives ``None``, which is fine as long as nothing needs them.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._batch import BatchError, attention_mask_of
from ..features import unwrap_model

LABELS = "labels"        # the default label key of mapping batches
IGNORE_INDEX = -100      # targets with this value count neither in the task loss nor in the accuracy


# -- splitting -----------------------------------------------------------------------------------
def split(batch: Any, label_key: str = LABELS) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch: an ``(inputs, targets)`` pair, or a mapping whose
    ``label_key`` entry is the targets (``None`` when absent) and whose other entries are the inputs."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != label_key}
        if not inputs:
            raise BatchError(f"a mapping batch needs model inputs besides {label_key!r}; it holds only "
                             f"{sorted(map(str, batch))}")
        return inputs, batch.get(label_key)
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError("each batch must be an (inputs, targets) pair or a mapping of model inputs (with "
                        f"{label_key!r} as targets), got "
                        + (f"a {type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list))
                           else f"a {type(batch).__name__}"))
    return batch[0], batch[1]


def split_indexed(batch: Any, label_key: str = LABELS) -> tuple[Any, Any, Any]:
    """``(indices, inputs, targets)`` of an indexed batch: ``(indices, inputs, targets)`` or
    ``(indices, mapping)`` (what :func:`distillx.teacher_cache.indexed_loader` yields)."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise TypeError(f"an indexed batch must be (indices, inputs, targets) or (indices, mapping), got "
                        f"a {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list))
                                                       else ""))
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    inputs, targets = split(batch[1], label_key)
    return batch[0], inputs, targets


def to_device(x: Any, device: torch.device) -> Any:
    """``x`` with every tensor in it on ``device`` (non-blocking), through mappings, tuples and lists."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(to_device(v, device) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def unpack_batch(batch: Any, device: torch.device, label_key: str = LABELS) -> tuple[Any, Any]:
    """Split a batch into ``(inputs, targets)`` on ``device``."""
    inputs, targets = split(batch, label_key)
    return to_device(inputs, device), to_device(targets, device)


def batch_size(inputs: Any, targets: Any) -> int:
    """The number of samples: ``len(targets)``, else the first dim of the first tensor in ``inputs``."""
    if isinstance(targets, torch.Tensor) and targets.dim() > 0:
        return len(targets)
    first = _first_tensor(inputs)
    if first is None or first.dim() == 0:
        raise BatchError(f"cannot tell the batch size: no tensor with a batch dim in the inputs ({_describe(inputs)})")
    return first.shape[0]


def _first_tensor(x: Any) -> Optional[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return x
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    if isinstance(x, Mapping):
        return f"a mapping with keys {sorted(map(str, x))}"
    return f"a {type(x).__name__}"


# -- calling a model -----------------------------------------------------------------------------
def _forward_params(model: nn.Module) -> tuple[dict[str, inspect.Parameter], bool]:
    """``({name: parameter}, takes **kwargs)`` of ``model.forward``'s named parameters."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}, True
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind == p.VAR_KEYWORD for p in params.values())


def model_kwargs(model: nn.Module, inputs: Mapping, who: str = "model") -> dict[str, Any]:
    """The entries of ``inputs`` that ``model.forward`` accepts by name (all of them when it only
    takes ``**kwargs``); :class:`BatchError` when one it requires, or its main input, is missing."""
    named, var_kw = _forward_params(model)
    if not named:
        return dict(inputs)
    kwargs = {k: v for k, v in inputs.items() if k in named}
    missing = [n for n, p in named.items() if p.default is inspect.Parameter.empty and n not in inputs]
    main = getattr(model, "main_input_name", None)  # transformers: "input_ids", "pixel_values", ...
    if isinstance(main, str) and main in named and main not in inputs and "inputs_embeds" not in inputs \
            and main not in missing:
        missing.append(main)
    if missing or not kwargs:
        need = ("missing " + ", ".join(map(repr, missing)) if missing
                else "none of its inputs " + ", ".join(map(repr, sorted(named))))
        raise BatchError(f"the batch does not hold what the {who} ({type(model).__name__}) needs: {need}; the batch "
                         f"has keys {sorted(map(str, inputs))} (mapping batches are passed as model(**batch), with "
                         "the keys its forward accepts)")
    return kwargs


def call_model(model: nn.Module, inputs: Any, who: str = "model") -> Any:
    """``model(inputs)`` for a tensor, ``model(*inputs)`` for a tuple, ``model(**kwargs)`` for a
    mapping (the keys ``forward`` accepts). Wrappers (DDP, ``torch.compile``) are called, their
    inner model's signature decides; a module with ``distillx_whole_inputs = True`` gets the inputs as they are."""
    inner = unwrap_model(model)
    if getattr(inner, "distillx_whole_inputs", False):
        return model(inputs)
    if isinstance(inputs, Mapping):
        attention_mask_of(inputs)  # a malformed mask is reported here, naming the batch
        return model(**model_kwargs(inner, inputs, who))
    if isinstance(inputs, tuple) and not hasattr(inputs, "_fields"):
        return model(*inputs)
    return model(inputs)


def logits_of(output: Any, who: str, required: bool = True) -> Optional[torch.Tensor]:
    """The logits in a model output: a tensor, the first element of a tuple/list, or the ``logits``
    entry of a mapping / ``ModelOutput``. None when there are none and not ``required``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        logits = output.get("logits")
        if isinstance(logits, torch.Tensor):
            return logits
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if not required:
        return None
    what = (f"a {type(output).__name__} with keys {', '.join(map(repr, output))}" if isinstance(output, Mapping)
            else f"a {type(output).__name__}")
    raise TypeError(f"{who} must return logits (a tensor, a tuple whose first element is a tensor, or a mapping "
                    f"with a 'logits' tensor), got {what}")


# -- the default task loss and accuracy ----------------------------------------------------------
def _token_layout(logits: torch.Tensor, targets: torch.Tensor) -> bool:
    """True for channels-last token logits (B, L, C) with (B, L) class targets."""
    if logits.dim() < 3 or targets.is_floating_point():
        return False
    channels_first = tuple(targets.shape) == (logits.shape[0], *logits.shape[2:])
    return not channels_first and tuple(targets.shape) == tuple(logits.shape[:-1])


def task_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with ``ignore_index=-100``, the mean over the labelled targets; (B, L, C) token
    logits with (B, L) targets are flattened (PyTorch's own (B, C, ...) layout and soft (N, C) targets
    work as in ``F.cross_entropy``).

    Nothing labelled (every target ``-100``, or no rows) is a loss of 0 with a zero gradient,
    distillx's rule for all its losses: ``F.cross_entropy`` would give NaN, which stops training."""
    if _token_layout(logits, targets):
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if targets.is_floating_point():  # soft targets: every row counts
        if logits.numel() == 0:
            return logits.flatten()[:0].sum()
        return F.cross_entropy(logits, targets)
    # The sum over the labelled targets divided by their count (at least 1): the mean PyTorch
    # computes, without a host sync to ask whether any target is labelled.
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM: logits at position t against the target at t + 1,
    ``-100`` ignored (what Hugging Face ``*ForCausalLM`` models compute from ``labels``); 0 with a
    zero gradient when no target is left (all ``-100``, or length-1 sequences: no next token)."""
    if logits.dim() != 3 or tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"causal_lm_loss needs logits (B, L, C) and labels (B, L), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    return task_cross_entropy(logits[:, :-1], targets[:, 1:])


causal_lm_loss.next_token = True  # evaluate() shifts the accuracy the same way


def correct_and_counted(logits: torch.Tensor, targets: torch.Tensor, next_token: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(argmax hits, targets counted)`` as tensors on the logits' device; ``-100`` targets are not counted."""
    if next_token:
        logits, targets = logits[:, :-1], targets[:, 1:]
    if targets.is_floating_point():  # soft targets: the argmax class
        targets = targets.argmax(-1)
    elif logits.dim() >= 3 and not _token_layout(logits, targets):
        logits = logits.movedim(1, -1)  # (B, C, ...) -> (B, ..., C)
    pred = logits.argmax(-1)
    keep = targets != IGNORE_INDEX
    return ((pred == targets) & keep).sum(), keep.sum()


def check_loader(loader: Any, name: str) -> None:
    """Raise unless ``loader`` is iterable and, when it has a length, non-empty."""
    if not isinstance(loader, Iterable):
        raise TypeError(f"{name} must be an iterable of batches ((inputs, targets) pairs or mappings), "
                        f"got {type(loader).__name__}")
    try:
        empty = len(loader) == 0  # type: ignore[arg-type]
    except TypeError:  # iterable without __len__: emptiness is detected after the first pass
        empty = False
    if empty:
        raise ValueError(f"{name} is empty: it yields no batches")
