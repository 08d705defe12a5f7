"""Data builders for run configs: ``[data] builder = "distillx.config.data:digits"``.

A data builder is any ``callable(**options)`` returning ``{"train": loader, "val": loader or None}``
(or a ``(train, val)`` pair); a loader yields ``(inputs, targets)`` batches.
"""
from __future__ import annotations

from torch.utils.data import DataLoader

from .. import _checks
from ..data import digits_split, tensor_loader


def digits(batch_size: int = 64, test_fraction: float = 0.25, seed: int = 0,
           eval_batch_size: int = 512) -> dict[str, DataLoader]:
    """The bundled 8x8 digits (:func:`distillx.data.digits_split`): a shuffled training loader with
    its own generator seeded with ``seed`` (the same batches run after run, whatever the global RNG)
    and an ordered validation loader over the held-out ``test_fraction``. ``seed`` fixes the split
    and the training order."""
    _checks.integer("batch_size", batch_size, ge=1)
    _checks.integer("eval_batch_size", eval_batch_size, ge=1)
    _checks.number("test_fraction", test_fraction, gt=0, lt=1)
    _checks.integer("seed", seed)
    split = digits_split(float(test_fraction), seed)
    return {"train": tensor_loader(split.x_train, split.y_train, batch_size, shuffle=True, seed=seed),
            "val": tensor_loader(split.x_test, split.y_test, eval_batch_size)}
