"""The 8x8 handwritten digits, shipped inside the package.

This is the UCI ML "Optical Recognition of Handwritten Digits" test set (1,797 images of 8x8 pixels,
values 0..16, ten classes), the same array scikit-learn bundles as ``sklearn.datasets.load_digits``.
It was exported once at development time; at run time nothing is downloaded and scikit-learn is not
needed.

File format of ``optdigits.u8.gz`` (gzip of, little-endian):

    magic b"DXDG" | uint8 version=1 | uint32 N | uint8 height | uint8 width
    | N*height*width uint8 pixels (row-major images, 0..16) | N uint8 labels (0..9)

A SHA-256 of pixels+labels is checked on load so a truncated or altered file fails loudly instead
of silently training on wrong data. (Why gzip of raw bytes rather than something denser: it is
lossless, needs only the standard library, and at ~44 kB it is already small: the per-pixel-position
entropy of the data is ~35 kB, and re-ordering, delta or bit-plane layouts, bz2 and xz all landed
between 35 and 45 kB, not worth a custom format.)
"""
from __future__ import annotations

import gzip
import hashlib
import struct
from functools import lru_cache
from importlib import resources
from typing import NamedTuple

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

FILENAME = "optdigits.u8.gz"
NUM_CLASSES = 10
NUM_FEATURES = 64
MAX_PIXEL = 16  # pixel values are counts of set pixels in 4x4 blocks of a 32x32 bitmap: 0..16
_HEADER = struct.Struct("<4sBIBB")
_MAGIC, _VERSION = b"DXDG", 1
# sha256(pixels || labels) of the array exported from scikit-learn 1.9.1 load_digits().
_SHA256 = "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"


class DigitsSplit(NamedTuple):
    """A train/test split: float inputs (N, 64) in [0, 1] and int64 labels (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@lru_cache(maxsize=1)
def _read_raw() -> tuple[bytes, bytes]:
    """Decompress and validate the shipped file once; returns (pixels, labels) as raw bytes."""
    blob = gzip.decompress(resources.files(__package__).joinpath(FILENAME).read_bytes())
    if len(blob) < _HEADER.size:
        raise RuntimeError(f"distillx digits data file {FILENAME} is truncated (reinstall distillx)")
    magic, version, n, h, w = _HEADER.unpack_from(blob)
    if magic != _MAGIC or version != _VERSION:
        raise RuntimeError(f"{FILENAME}: unknown format (magic {magic!r}, version {version})")
    start = _HEADER.size
    pixels, labels = blob[start:start + n * h * w], blob[start + n * h * w:]
    if h * w != NUM_FEATURES or len(pixels) != n * h * w or len(labels) != n:
        raise RuntimeError(f"{FILENAME}: size mismatch (header says {n} images of {h}x{w}, file has {len(blob)} bytes)")
    if hashlib.sha256(pixels + labels).hexdigest() != _SHA256:
        raise RuntimeError(f"{FILENAME}: checksum mismatch, the data file is corrupt (reinstall distillx)")
    return pixels, labels


def load_digits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Return all 1,797 digits as ``(x, y)``: ``x`` of shape (1797, 64) scaled to [0, 1], ``y`` int64 in 0..9.

    Pixels are divided by 16 (their maximum), so the scaling is fixed and identical for every split.
    Returns fresh tensors on every call, so callers may modify them in place.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    pixels, labels = _read_raw()
    x = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).reshape(-1, NUM_FEATURES)
    y = torch.frombuffer(bytearray(labels), dtype=torch.uint8).to(torch.int64)
    return x.to(dtype) / MAX_PIXEL, y


def digits_split(test_fraction: float = 0.25, seed: int = 0, dtype: torch.dtype = torch.float32) -> DigitsSplit:
    """Stratified, seeded train/test split of :func:`load_digits`.

    Each class contributes ``round(count * test_fraction)`` images to the test set, picked by a
    permutation drawn from ``torch.Generator().manual_seed(seed)``, so the split depends only on
    ``(test_fraction, seed)`` and never on the global RNG. Within each part, images keep their
    original order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = load_digits(dtype)
    g = torch.Generator().manual_seed(int(seed))
    is_test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(NUM_CLASSES):
        idx = (y == c).nonzero().flatten()
        k = int(round(len(idx) * test_fraction))
        is_test[idx[torch.randperm(len(idx), generator=g)[:k]]] = True
    return DigitsSplit(x[~is_test], y[~is_test], x[is_test], y[is_test])


def tensor_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
                  seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` over in-memory tensors yielding ``(inputs, targets)``.

    It samples whole index batches and indexes the tensors once per batch (``batch_size=None`` with a
    ``BatchSampler``), which avoids the per-sample ``__getitem__`` + collate cost of the default path:
    on tiny data like digits that overhead would dominate training time. With ``shuffle=True`` the
    order comes from a dedicated generator seeded with ``seed``: two loaders built with the same
    arguments yield the same batches epoch after epoch, independent of the global RNG.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    ds = TensorDataset(x, y)
    base = RandomSampler(ds, generator=torch.Generator().manual_seed(int(seed))) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(base, batch_size, drop_last), batch_size=None)


def digits_loaders(batch_size: int = 64, test_fraction: float = 0.25, seed: int = 0,
                   eval_batch_size: int = 512) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)`` over :func:`digits_split`: shuffled (seeded) train, ordered test.

    ``seed`` fixes both the split and the training order.
    """
    s = digits_split(test_fraction, seed)
    return (tensor_loader(s.x_train, s.y_train, batch_size, shuffle=True, seed=seed),
            tensor_loader(s.x_test, s.y_test, eval_batch_size))
