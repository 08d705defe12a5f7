"""Data builders for run configs: ``[data] builder = "distillx.config.data:digits"``.

A data builder is any ``callable(**options)`` returning ``{"train": loader, "val": loader or None}``
(or a ``(train, val)`` pair); a loader yields ``(inputs, targets)`` batches.
"""
from __future__ import annotations

from torch.utils.data import DataLoader

from ..data import digits_split, tensor_loader


def digits(batch_size: int = 64, test_fraction: float = 0.25, seed: int = 0,
           eval_batch_size: int = 512) -> dict[str, DataLoader]:
    """The bundled 8x8 digits (:func:`distillx.data.digits_split`): a shuffled training loader with
    its own generator seeded with ``seed`` (the same batches run after run, whatever the global RNG)
    and an ordered validation loader over the held-out ``test_fraction``. ``seed`` fixes the split
    and the training order."""
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    split = digits_split(float(test_fraction), seed)
    return {"train": tensor_loader(split.x_train, split.y_train, batch_size, shuffle=True, seed=seed),
            "val": tensor_loader(split.x_test, split.y_test, eval_batch_size)}
