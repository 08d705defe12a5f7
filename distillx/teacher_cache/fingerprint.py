"""What a cache was built from, as hashes: the teacher (weights and code) and the dataset's inputs.

A cached value is ``teacher(inputs_i)`` captured at some layers: it changes when the teacher's
weights change, when its code changes (another activation with the same weights, another class,
an edited ``forward``), when the inputs change (another split of the same size), or when what is
captured changes. :func:`teacher_fingerprint` covers the first two (plus the sample count and the
caller's ``extra`` string, where :func:`~distillx.teacher_cache.cache_for_run` puts the capture
points and reductions); :func:`inputs_fingerprint` the third. Targets are left out on purpose: the
teacher's outputs do not depend on them.
"""
from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..engine.batches import LABELS, split_indexed
from .indexed import _check_loader, build_loader
from .storage import FORMAT, FORMAT_VERSION


def teacher_fingerprint(teacher: nn.Module, num_samples: int, extra: Optional[str] = None) -> str:
    """The default cache fingerprint: sha256 over

    - the teacher's ``state_dict`` (every entry's name, dtype, shape and bytes, buffers included);
    - its code as far as it can be known: every submodule's name, class (module and qualified name)
      and ``extra_repr()``, and the source of every class in it that :func:`inspect.getsource`
      finds (so ReLU -> Tanh with the same weights, or an edited ``forward``, is another teacher);
    - ``num_samples`` and the optional ``extra`` string (e.g. the capture configuration).

    Reads every weight once (moved to CPU tensor by tensor)."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    h = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}\0n={int(num_samples)}\0".encode())
    if extra is not None:
        h.update(f"extra={extra}\0".encode())
    classes: dict[type, None] = {}
    for name, module in teacher.named_modules():
        cls = type(module)
        classes.setdefault(cls)
        h.update(f"module {name}:{cls.__module__}.{cls.__qualname__}({module.extra_repr()})\0".encode())
    for cls in classes:
        h.update(_source(cls).encode())
    for name, value in teacher.state_dict().items():
        if not isinstance(value, torch.Tensor):
            h.update(f"{name}:{value!r}\0".encode())
            continue
        if value.is_meta:
            raise ValueError(f"cannot fingerprint the teacher: its state_dict entry {name!r} is on the meta device "
                             "(no data); load the weights first or pass fingerprint=")
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)}\0".encode())
        _update_tensor(h, value)
    return h.hexdigest()


def inputs_fingerprint(loader: Any, *, batch_size: Optional[int] = None, label_key: str = LABELS) -> str:
    """sha256 of the inputs of every sample of ``loader.dataset``, in index order, as the cache build
    batches them (``loader``'s collate function and batch size, no shuffling, no ``drop_last``);
    targets (and a mapping's ``label_key``) are not inputs and are left out.

    One pass over the data without the teacher: what :meth:`TeacherCache.build_or_open` pays to
    know that the cache on disk belongs to these inputs (``verify_inputs=False`` skips it)."""
    dataset = _check_loader(loader)
    h = hashlib.sha256(b"inputs\0")
    for batch in build_loader(loader, dataset, batch_size):
        update_inputs(h, batch, label_key)
    return h.hexdigest()


def update_inputs(h: "hashlib._Hash", batch: Any, label_key: str = LABELS) -> None:
    """Add the inputs of one indexed batch (``(indices, inputs, targets)`` or ``(indices, mapping)``)."""
    _, inputs, _ = split_indexed(batch, label_key)
    _update(h, inputs)


def _update(h: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, torch.Tensor):
        h.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        _update_tensor(h, value)
    elif isinstance(value, np.ndarray):
        _update(h, torch.from_numpy(np.ascontiguousarray(value)))
    elif isinstance(value, Mapping):
        h.update(f"M{len(value)}".encode())
        for key in sorted(value, key=repr):
            h.update(f"{key!r}=".encode())
            _update(h, value[key])
    elif isinstance(value, (tuple, list)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for v in value:
            _update(h, v)
    elif value is None or isinstance(value, (str, bytes, int, float, complex, bool)):
        h.update(f"{type(value).__name__}:{value!r}\0".encode())
    else:
        text = repr(value)
        if " at 0x" in text:  # an address is not an identity: two runs would never agree
            raise TypeError(f"cannot fingerprint the teacher's inputs: a batch holds a {type(value).__name__} "
                            "whose repr is not its content; collate it into tensors, or pass "
                            "verify_inputs=False (and a fingerprint= that identifies the data)")
        h.update(f"{type(value).__module__}.{type(value).__qualname__}:{text}\0".encode())


def _update_tensor(h: "hashlib._Hash", value: torch.Tensor) -> None:
    data = value.detach()
    if data.layout != torch.strided:
        data = data.to_dense()
    data = data.cpu().contiguous().reshape(-1).view(torch.uint8)
    if data.numel():
        h.update(data.numpy().tobytes())


def _source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):  # built in, defined interactively, or no file: the names above stand for it
        return f"{cls.__module__}.{cls.__qualname__}"
