"""Offline distillation: run the teacher once over a dataset and keep its outputs on disk.

::

    from distillx.teacher_cache import TeacherCache, indexed_loader

    cache = TeacherCache.build_or_open(teacher, train_loader, "cache/teacher", dtype=torch.float16)
    for indices, inputs, targets in indexed_loader(train_loader):       # same shuffling as train_loader
        t = cache.lookup(indices, device="cuda")                          # {"logits": (B, C) float32, ...}
        loss = kd_loss(student(inputs.cuda()), t["logits"], temperature=4.0)

Sample identity: a cached output belongs to dataset item ``i``. :class:`IndexedDataset` makes item
``i`` come out as ``(i, *dataset[i])`` and :func:`indexed_loader` rebuilds a DataLoader around it
with the original sampler (the same object, so the same shuffling), batch size, ``drop_last`` and
collate function, yielding ``(indices, inputs, targets)``; ``cache.lookup(indices)`` then returns
the teacher outputs of exactly those samples. Only map-style datasets have stable indices, so
iterable datasets and plain iterables of batches are refused.

Building: :meth:`TeacherCache.build` runs the teacher once per sample, in ``eval()`` mode under
``torch.no_grad()``, over the loader's dataset in index order (its own non-shuffled loader, same
batch size and collate function, no ``drop_last``: every sample is cached). It stores the logits
``(N, *logit_shape)`` or, with ``top_k=k``, only the ``k`` largest logits and their class indices
``(N, ..., k)``, plus every feature returned by the optional ``capture(inputs)`` callable (a tensor
with the batch as first dim; batch-level statistics cannot be cached per sample and are refused).
Floating-point tensors are stored as ``dtype`` (float16 halves the size; a value that overflows
float16 is an error naming the tensor), integer/bool features keep their dtype, top-k class
indices are stored as int32.

On disk (``directory``)::

    manifest.json          format/version, N, fingerprint, dtype, top_k, per-tensor file/shape/dtype
    000-logits.bin         raw C-order array, shape (N, C), no header (numpy.memmap layout)
    001-<feature>.bin      ...

The data files are raw arrays written and read with :class:`numpy.memmap` (read-only when
opened), so opening a cache loads nothing: :meth:`TeacherCache.lookup` reads only the rows asked
for (numpy fancy indexing on the map copies those rows out) and converts them to float32 tensors
on the requested device (the upcast from float16 happens after the transfer, so half the bytes
move). ``manifest.json`` is written last, atomically (temporary file, fsync, rename), after the
data files were flushed: a directory without a manifest is never a cache, so an interrupted build
is rebuilt by :meth:`TeacherCache.build_or_open`. A build first removes the old manifest, then
unlinks (never truncates) the old data files, so a cache object still open on the old files keeps
reading valid data.

Validity: :meth:`TeacherCache.open` checks the manifest, the data files (present, right size), and
optionally the sample count and the fingerprint; any problem is a :class:`CacheMismatchError`
naming what does not match (expected vs found). The default fingerprint
(:func:`teacher_fingerprint`) hashes the teacher's ``state_dict`` (names, dtypes, shapes and
values; buffers included) and the dataset length. It does not see the dataset's *contents*: pass
``fingerprint=teacher_fingerprint(teacher, len(dataset), extra="cifar10-train-v2")`` (or any
string of your own, which then replaces the default entirely) to tie the cache to a dataset
identity or to the capture configuration.

Concurrency: building is not locked. With several processes (DDP ranks) build on one rank, wait
(a barrier), then :meth:`TeacherCache.open` everywhere.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate, default_convert

from ._atomic import atomic_open
from .training import logits_of, resolve_device

__all__ = ["TeacherCache", "CacheMismatchError", "IndexedDataset", "indexed_loader", "teacher_fingerprint",
           "FORMAT", "FORMAT_VERSION", "MANIFEST"]

log = logging.getLogger(__name__)

FORMAT = "distillx.teacher_cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOGITS = "logits"
TOPK_VALUES = "topk_values"
TOPK_INDICES = "topk_indices"
_RESERVED = (TOPK_VALUES, TOPK_INDICES)
_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_UNSET = object()


class CacheMismatchError(ValueError):
    """The cache directory does not hold a complete cache matching what was expected; the message
    names what does not match (expected vs found)."""


# -- sample indices ------------------------------------------------------------------------------

class _IndexedSample(tuple):
    """``(i, *item)`` that remembers the original ``item``, so the collate function sees it unchanged."""

    def __new__(cls, index: int, item: Any):
        self = super().__new__(cls, (index, *item) if isinstance(item, (tuple, list)) else (index, item))
        self.item = item
        return self

    def __reduce__(self):
        return _IndexedSample, (self[0], self.item)


class IndexedDataset(Dataset):
    """A map-style dataset whose item ``i`` is ``(i, *dataset[i])`` (``(i, dataset[i])`` when the
    item is not a tuple/list): with ``(inputs, targets)`` items, ``(index, inputs, targets)``."""

    def __init__(self, dataset: Dataset):
        _check_map_style(dataset, "dataset")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        return _IndexedSample(int(index), self.dataset[index])

    def __getitems__(self, indices: Sequence[int]) -> list:
        # DataLoader fetches a whole batch through __getitems__ when the dataset has one (Subset,
        # Hugging Face datasets): keep that fast path.
        inner = getattr(self.dataset, "__getitems__", None)
        items = inner(list(indices)) if inner else None
        if not isinstance(items, list) or len(items) != len(indices):
            items = [self.dataset[i] for i in indices]
        return [_IndexedSample(int(i), item) for i, item in zip(indices, items)]

    def __repr__(self) -> str:
        return f"IndexedDataset({self.dataset!r})"


class _IndexedCollate:
    """Collate ``(i, *item)`` samples into ``(indices, *collate_fn(items))``.

    The wrapped ``collate_fn`` receives the original items, so a custom collate written for the
    plain loader works unchanged; a result that is not a tuple/list comes out as ``(indices, result)``.
    A top-level class (not a closure) so worker processes can pickle it.
    """

    def __init__(self, collate_fn: Callable, batched: bool = True):
        self.collate_fn = collate_fn
        self.batched = batched

    def __call__(self, samples):
        if not self.batched:  # automatic batching off: one sample at a time
            index, item = _split_sample(samples)
            return _prepend(torch.tensor(index, dtype=torch.int64), self.collate_fn(item))
        indices, items = [], []
        for s in samples:
            index, item = _split_sample(s)
            indices.append(index)
            items.append(item)
        return _prepend(torch.tensor(indices, dtype=torch.int64), self.collate_fn(items))


def _split_sample(sample) -> tuple[int, Any]:
    if isinstance(sample, _IndexedSample):
        return sample[0], sample.item
    if not isinstance(sample, (tuple, list)) or len(sample) < 2:
        raise TypeError(f"indexed samples must be (index, *item) tuples, got {type(sample).__name__}")
    return int(sample[0]), (sample[1] if len(sample) == 2 else tuple(sample[1:]))


def _prepend(indices: torch.Tensor, batch: Any) -> tuple:
    return (indices, *batch) if isinstance(batch, (tuple, list)) else (indices, batch)


def _check_map_style(dataset: Any, what: str) -> None:
    if isinstance(dataset, IterableDataset):
        raise ValueError(f"{what} is an IterableDataset ({type(dataset).__name__}): its samples have no stable "
                         "index, so teacher outputs cannot be cached per sample. Use a map-style dataset "
                         "(__getitem__ and __len__), or compute the teacher live.")
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise ValueError(f"{what} ({type(dataset).__name__}) is not a map-style dataset (it needs __getitem__ "
                         "and __len__): teacher outputs can only be cached per sample index")


def _check_loader(loader: Any) -> Dataset:
    if not isinstance(loader, DataLoader):
        raise ValueError(f"expected a torch.utils.data.DataLoader over a map-style dataset, got "
                         f"{type(loader).__name__}: a plain iterable of batches has no sample indices, so the "
                         "teacher outputs of its batches cannot be cached or looked up. Wrap the data in a "
                         "map-style Dataset and a DataLoader.")
    dataset = loader.dataset
    _check_map_style(dataset, "the loader's dataset")
    return dataset.dataset if isinstance(dataset, IndexedDataset) else dataset


def _loader_options(loader: DataLoader) -> dict:
    """The worker/memory options of ``loader``, to give a derived DataLoader the same behaviour."""
    opts = dict(num_workers=loader.num_workers, pin_memory=loader.pin_memory, timeout=loader.timeout,
                worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
                prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
                pin_memory_device=loader.pin_memory_device)
    if hasattr(loader, "in_order"):
        opts["in_order"] = loader.in_order
    return opts


def indexed_loader(loader: DataLoader) -> DataLoader:
    """A DataLoader like ``loader`` whose batches are ``(indices, inputs, targets)``.

    It iterates :class:`IndexedDataset` ``(loader.dataset)`` with the *same* sampler object (so the
    same shuffling when the loader was given a seeded ``generator``; ``set_epoch`` on a
    DistributedSampler acts on both), the same batch size / batch sampler, ``drop_last``,
    ``generator``, worker and pinning options, and the same collate function applied to the
    original items (``indices`` is an int64 tensor prepended to its result).

    Raises:
        ValueError: ``loader`` is not a DataLoader, or its dataset is not map-style (an
            IterableDataset or anything without ``__getitem__``/``__len__``): such data has no sample
            indices, so its teacher outputs cannot be cached.
    """
    dataset = _check_loader(loader)
    collate = loader.collate_fn
    if isinstance(collate, _IndexedCollate):  # indexed_loader(indexed_loader(x)) == indexed_loader(x)
        collate = collate.collate_fn
    opts = _loader_options(loader)
    opts["generator"] = loader.generator
    if loader.batch_size is not None:  # the usual case: BatchSampler(sampler, batch_size, drop_last)
        return DataLoader(IndexedDataset(dataset), batch_size=loader.batch_size, sampler=loader.sampler,
                          drop_last=loader.drop_last, collate_fn=_IndexedCollate(collate), **opts)
    if loader.batch_sampler is not None:  # a custom batch sampler
        return DataLoader(IndexedDataset(dataset), batch_sampler=loader.batch_sampler,
                          collate_fn=_IndexedCollate(collate), **opts)
    return DataLoader(IndexedDataset(dataset), batch_size=None, sampler=loader.sampler,  # no auto-batching
                      collate_fn=_IndexedCollate(collate, batched=False), **opts)


# -- fingerprint ---------------------------------------------------------------------------------

def teacher_fingerprint(teacher: nn.Module, num_samples: int, extra: Optional[str] = None) -> str:
    """The default cache fingerprint: sha256 over the teacher's ``state_dict`` (every entry's name,
    dtype, shape and bytes, buffers included), ``num_samples`` and the optional ``extra`` string
    (e.g. a dataset identity). Reads every weight once (moved to CPU tensor by tensor)."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    h = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}\0n={int(num_samples)}\0".encode())
    if extra is not None:
        h.update(f"extra={extra}\0".encode())
    for name, value in teacher.state_dict().items():
        if not isinstance(value, torch.Tensor):
            h.update(f"{name}:{value!r}\0".encode())
            continue
        if value.is_meta:
            raise ValueError(f"cannot fingerprint the teacher: its state_dict entry {name!r} is on the meta device "
                             "(no data); load the weights first or pass fingerprint=")
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)}\0".encode())
        data = value.detach()
        if data.layout != torch.strided:
            data = data.to_dense()
        data = data.cpu().contiguous().reshape(-1).view(torch.uint8)
        h.update(data.numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


# -- the cache -----------------------------------------------------------------------------------

class TeacherCache:
    """Teacher outputs for every sample of a dataset, memory-mapped from ``directory``.

    Create with :meth:`build`, :meth:`open` or :meth:`build_or_open`; read with :meth:`lookup`.
    ``len(cache)`` is the number of samples; :meth:`keys` what :meth:`lookup` returns;
    :attr:`nbytes` the size on disk; :attr:`directory` the absolute path. ``was_built`` says
    whether this object came from a build (True) or reopened an existing cache (False).
    """

    def __init__(self, directory: str, manifest: dict, *, was_built: bool = False):
        self.directory = os.path.abspath(os.fspath(directory))
        self.manifest = manifest
        self.was_built = was_built
        self._arrays = _map_arrays(self.directory, manifest)

    # -- creation --------------------------------------------------------------------------------
    @classmethod
    def build(cls, teacher: nn.Module, loader: DataLoader, directory: Union[str, os.PathLike], *,
              capture: Optional[Callable[[Any], Mapping[str, torch.Tensor]]] = None,
              dtype: Union[torch.dtype, str] = torch.float16, top_k: Optional[int] = None,
              device: Union[None, str, torch.device] = None, fingerprint: Optional[str] = None,
              batch_size: Optional[int] = None) -> "TeacherCache":
        """Run ``teacher`` once over ``loader.dataset`` (index order) and store its outputs in ``directory``.

        Args:
            teacher: the teacher; run in ``eval()`` mode (every submodule's mode is restored
                afterwards) under ``torch.no_grad()``. It is not moved.
            loader: a DataLoader over a map-style dataset with ``(inputs, targets)`` items; its
                batch size, collate function and worker options are reused (not its sampler or
                ``drop_last``: every sample is cached, in index order).
            directory: created if missing; an existing cache there is replaced.
            capture: ``capture(inputs) -> {"logits": Tensor, key: Tensor, ...}``, the teacher
                outputs of one batch (e.g. a closure running the teacher with feature hooks).
                Default: ``{"logits": teacher(inputs)}``. Every value must be a tensor whose first
                dim is the batch, with the same per-sample shape in every batch.
            dtype: storage dtype of floating-point tensors, ``torch.float16`` (default) or
                ``torch.float32``.
            top_k: keep only the ``k`` largest logits per row (last dim) and their class indices;
                :meth:`lookup` rebuilds dense logits with ``-inf`` elsewhere.
            device: where the inputs are sent (default: the device of the teacher's first
                parameter).
            fingerprint: the fingerprint to store; default :func:`teacher_fingerprint` ``(teacher, N)``.
            batch_size: override the batch size (needed when ``loader`` has automatic batching off).

        Raises ValueError for an empty dataset, a non-map-style loader, a bad option or output, and
        whatever ``teacher``/``capture`` raises; after any failure no manifest exists.
        """
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if capture is not None and not callable(capture):
            raise TypeError(f"capture must be None or a callable inputs -> dict of tensors, got {type(capture).__name__}")
        dataset = _check_loader(loader)
        n = len(dataset)
        if n == 0:
            raise ValueError("the loader's dataset is empty (0 samples): there is nothing to cache")
        store_dtype = _check_dtype(dtype)
        top_k = _check_top_k(top_k)
        if fingerprint is None:
            fingerprint = teacher_fingerprint(teacher, n)
        elif not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint must be None or a string, got {type(fingerprint).__name__}")
        device = resolve_device(teacher, device)
        build_loader = _build_loader(loader, dataset, batch_size)
        directory = os.path.abspath(os.fspath(directory))
        os.makedirs(directory, exist_ok=True)
        _remove_old_cache(directory)

        writer = _Writer(directory, n, store_dtype, top_k)
        modes = [(m, m.training) for m in teacher.modules()]
        t0 = time.perf_counter()
        try:
            teacher.eval()
            with torch.no_grad():
                for batch in build_loader:
                    indices, inputs = batch[0], batch[1]
                    inputs = _to_device(inputs, device)
                    if capture is None:
                        outputs = {LOGITS: logits_of(teacher(inputs), "teacher")}
                    else:
                        outputs = capture(inputs)
                    writer.write(indices, outputs)
            manifest = writer.finish(fingerprint)
        except BaseException:
            writer.abort()
            raise
        finally:
            for m, mode in modes:
                m.training = mode
        manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
        manifest["batch_size"] = build_loader.batch_size
        _write_json_atomic(manifest, os.path.join(directory, MANIFEST))  # last: the cache now exists
        log.info("built teacher cache at %s: %d samples, keys %s, %.1f MB", directory, n,
                 list(manifest["tensors"]), sum(t["nbytes"] for t in manifest["tensors"].values()) / 1e6)
        return cls(directory, manifest, was_built=True)

    @classmethod
    def open(cls, directory: Union[str, os.PathLike], *, expect_fingerprint: Optional[str] = None,
             expect_len: Optional[int] = None, expect_dtype: Union[None, torch.dtype, str] = None,
             expect_top_k: Any = _UNSET, expect_keys: Optional[Iterable[str]] = None) -> "TeacherCache":
        """Reopen the cache in ``directory`` (nothing is loaded: the data files are memory-mapped).

        Raises :class:`CacheMismatchError` naming the problem when the manifest is missing or
        corrupt, a data file is missing or has the wrong size, or the cache differs from an
        ``expect_*`` value given: fingerprint, number of samples, storage dtype, ``top_k`` (None
        means dense logits) or keys (each must be available from :meth:`lookup`).
        """
        directory = os.path.abspath(os.fspath(directory))
        manifest = _read_manifest(directory)
        problems = []
        if expect_len is not None and int(expect_len) != manifest["num_samples"]:
            problems.append(f"number of samples: expected {int(expect_len)} (the dataset length), "
                            f"found {manifest['num_samples']}")
        if expect_fingerprint is not None and expect_fingerprint != manifest["fingerprint"]:
            problems.append(f"fingerprint: expected {expect_fingerprint!r}, found {manifest['fingerprint']!r} "
                            "(the teacher weights, the dataset or the caller's fingerprint changed)")
        if expect_dtype is not None:
            want = _dtype_name(_check_dtype(expect_dtype))
            if want != manifest["dtype"]:
                problems.append(f"dtype: expected {want}, found {manifest['dtype']}")
        if expect_top_k is not _UNSET:
            want_k = _check_top_k(expect_top_k)
            if want_k != manifest["top_k"]:
                problems.append(f"top_k: expected {want_k}, found {manifest['top_k']}")
        if expect_keys is not None:
            missing = [k for k in expect_keys if k not in _lookup_keys(manifest)]
            if missing:
                problems.append(f"keys: expected {missing} among the cached keys, found {_lookup_keys(manifest)}")
        if problems:
            raise CacheMismatchError(f"teacher cache at {directory} does not match: " + "; ".join(problems))
        return cls(directory, manifest)

    @classmethod
    def build_or_open(cls, teacher: nn.Module, loader: DataLoader, directory: Union[str, os.PathLike], *,
                      capture: Optional[Callable[[Any], Mapping[str, torch.Tensor]]] = None,
                      dtype: Union[torch.dtype, str] = torch.float16, top_k: Optional[int] = None,
                      device: Union[None, str, torch.device] = None, fingerprint: Optional[str] = None,
                      batch_size: Optional[int] = None, expect_keys: Optional[Iterable[str]] = None) -> "TeacherCache":
        """:meth:`open` the cache in ``directory`` if it is complete and matches (fingerprint, as
        :meth:`build` would compute it; dataset length; ``dtype``; ``top_k``; ``expect_keys`` if
        given, e.g. the feature keys ``capture`` returns), else :meth:`build` it (the reason is
        logged at INFO level). Arguments as in :meth:`build`."""
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        dataset = _check_loader(loader)
        n = len(dataset)
        if n == 0:
            raise ValueError("the loader's dataset is empty (0 samples): there is nothing to cache")
        if fingerprint is None:
            fingerprint = teacher_fingerprint(teacher, n)
        try:
            return cls.open(directory, expect_fingerprint=fingerprint, expect_len=n, expect_dtype=dtype,
                            expect_top_k=top_k, expect_keys=expect_keys)
        except CacheMismatchError as e:
            log.info("(re)building the teacher cache: %s", e)
        return cls.build(teacher, loader, directory, capture=capture, dtype=dtype, top_k=top_k, device=device,
                         fingerprint=fingerprint, batch_size=batch_size)

    # -- reading ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.manifest["num_samples"]

    def keys(self) -> list[str]:
        """What :meth:`lookup` returns: ``"logits"`` (when cached), ``"topk_values"``/``"topk_indices"``
        (with ``top_k``), then the captured features in capture order."""
        return _lookup_keys(self.manifest)

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def top_k(self) -> Optional[int]:
        return self.manifest["top_k"]

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of floating-point tensors (lookups always return float32)."""
        return _DTYPES[self.manifest["dtype"]]

    @property
    def nbytes(self) -> int:
        """Size on disk: the data files plus the manifest."""
        files = [t["file"] for t in self.manifest["tensors"].values()] + [MANIFEST]
        return sum(os.path.getsize(os.path.join(self.directory, f)) for f in files)

    def shape(self, key: str) -> tuple[int, ...]:
        """Per-sample shape of ``key`` as :meth:`lookup` returns it (without the batch dim)."""
        if key == LOGITS and self.top_k is not None:
            return tuple(self.manifest["logits_shape"])
        return tuple(self._entry(key)["shape"][1:])

    def array(self, key: str) -> np.ndarray:
        """The stored array of ``key`` (``(N, ...)``, a read-only :class:`numpy.memmap`; with
        ``top_k``, ``"logits"`` is not stored: use ``"topk_values"``/``"topk_indices"``)."""
        self._entry(key)
        return self._arrays[key]

    def lookup(self, indices: Union[torch.Tensor, Sequence[int], np.ndarray], *,
               device: Union[None, str, torch.device] = None,
               keys: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
        """The teacher outputs of the samples ``indices`` (a 1-D integer tensor/sequence, e.g. the
        first element of an :func:`indexed_loader` batch), in that order, on ``device`` (default CPU).

        Floating-point values come back as float32; ``"topk_indices"`` as int64. With ``top_k``,
        ``"logits"`` is dense ``(B, ..., C)`` with every class outside the top k at ``-inf``
        (softmax gives them probability 0; :func:`distillx.functional.kd_loss` accepts that).
        ``keys`` restricts the result (e.g. skip the dense logits of a large vocabulary). Only the
        rows asked for are read from disk.
        """
        idx = _check_indices(indices, len(self))
        device = torch.device("cpu") if device is None else torch.device(device)
        wanted = self.keys() if keys is None else list(keys)
        for k in wanted:
            if k not in self.keys():
                raise KeyError(f"{k!r} is not in the teacher cache; it holds {self.keys()}")
        out: dict[str, torch.Tensor] = {}
        for key in wanted:
            if key == LOGITS and self.top_k is not None:
                values = self._read(TOPK_VALUES, idx, device)
                classes = self._read(TOPK_INDICES, idx, device)
                dense = torch.full((*values.shape[:-1], self.manifest["num_classes"]), -math.inf,
                                   dtype=torch.float32, device=device)
                out[key] = dense.scatter_(-1, classes, values)
            else:
                out[key] = self._read(key, idx, device)
        return out

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        """``cache[indices]`` is ``cache.lookup(indices)`` (CPU)."""
        return self.lookup(indices)

    def __repr__(self) -> str:
        return (f"TeacherCache({self.directory!r}, n={len(self)}, keys={self.keys()}, dtype={self.manifest['dtype']}, "
                f"top_k={self.top_k})")

    # Pickling (e.g. to DataLoader workers) sends the path, not the mapped data.
    def __getstate__(self) -> dict:
        return {"directory": self.directory, "manifest": self.manifest, "was_built": self.was_built}

    def __setstate__(self, state: dict) -> None:
        self.directory, self.manifest, self.was_built = state["directory"], state["manifest"], state["was_built"]
        self._arrays = _map_arrays(self.directory, self.manifest)

    def _entry(self, key: str) -> dict:
        entry = self.manifest["tensors"].get(key)
        if entry is None:
            raise KeyError(f"{key!r} is not stored in the teacher cache; it holds {list(self.manifest['tensors'])}")
        return entry

    def _read(self, key: str, idx: np.ndarray, device: torch.device) -> torch.Tensor:
        rows = torch.from_numpy(np.ascontiguousarray(self._arrays[key][idx]))  # fancy indexing copies the rows
        rows = rows.to(device)
        if rows.is_floating_point():
            return rows.float()
        return rows.long() if key == TOPK_INDICES else rows


# -- building ------------------------------------------------------------------------------------

def _build_loader(loader: DataLoader, dataset: Dataset, batch_size: Optional[int]) -> DataLoader:
    """A sequential, complete (no drop_last) indexed loader with ``loader``'s batch size and collate."""
    if batch_size is None:
        batch_size = loader.batch_size
        if batch_size is None and loader.batch_sampler is not None:
            batch_size = getattr(loader.batch_sampler, "batch_size", None)
        if batch_size is None:
            raise ValueError("cannot tell the loader's batch size (automatic batching is off or its batch sampler "
                             "has no batch_size): pass batch_size= to the cache build")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    collate = loader.collate_fn
    if isinstance(collate, _IndexedCollate):
        collate = collate.collate_fn
    if loader.batch_sampler is None:  # no auto-batching: its collate_fn converts single samples
        if collate is not default_convert:
            raise ValueError("the loader has automatic batching off (batch_size=None) and a custom collate_fn "
                             "for single samples; give the cache build a batched DataLoader")
        collate = default_collate
    opts = _loader_options(loader)
    opts["persistent_workers"] = False  # one pass
    return DataLoader(IndexedDataset(dataset), batch_size=batch_size, shuffle=False, drop_last=False,
                      collate_fn=_IndexedCollate(collate), **opts)


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)) and not hasattr(x, "_fields"):
        return type(x)(_to_device(v, device) for v in x)
    return x


class _Writer:
    """Creates the data files from the first batch and writes every batch at its sample indices."""

    def __init__(self, directory: str, n: int, dtype: torch.dtype, top_k: Optional[int]):
        self.directory, self.n, self.dtype, self.top_k = directory, n, dtype, top_k
        self.entries: dict[str, dict] = {}  # stored key -> manifest entry
        self.arrays: dict[str, np.ndarray] = {}
        self.keys: Optional[list[str]] = None  # the capture keys, in order
        self.logits_shape: Optional[tuple] = None
        self.rows = 0
        self.created: list[str] = []

    def write(self, indices: torch.Tensor, outputs: Any) -> None:
        if not isinstance(outputs, Mapping):
            raise TypeError(f"capture must return a dict of tensors, got {type(outputs).__name__}")
        idx = indices.numpy()
        b = len(idx)
        where = f"batch of samples {int(idx[0])}..{int(idx[-1])}"
        keys = list(outputs)
        if self.keys is None:
            for k in keys:
                if not isinstance(k, str):
                    raise TypeError(f"capture returned a non-string key {k!r}")
                if k in _RESERVED:
                    raise ValueError(f"capture returned the reserved key {k!r} (used for the top-k logits)")
            if self.top_k is not None and LOGITS not in outputs:
                raise ValueError(f"top_k={self.top_k} needs logits, but capture returned no 'logits' (keys {keys})")
        elif keys != self.keys:
            raise ValueError(f"capture returned keys {keys} for the {where} but {self.keys} before; every batch "
                             "must give the same keys")
        stored = {}
        for k, v in outputs.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"teacher output {k!r} is a {type(v).__name__}, not a tensor: only per-sample "
                                "tensors (batch as first dim) can be cached; batch-level statistics depend on the "
                                "batch composition and must be computed live")
            if v.dim() == 0 or v.shape[0] != b:
                raise ValueError(f"teacher output {k!r} has shape {tuple(v.shape)} for a {where} of {b} samples: only "
                                 "per-sample tensors (batch as first dim) can be cached; batch-level statistics "
                                 "must be computed live")
            if v.is_complex():
                raise TypeError(f"teacher output {k!r} is complex ({v.dtype}); the cache stores real tensors")
            v = v.detach()
            if k == LOGITS and self.top_k is not None:
                if v.dim() < 2 or not v.is_floating_point():
                    raise ValueError(f"top_k needs floating-point logits with a class dim (B, ..., C), got "
                                     f"{v.dtype} of shape {tuple(v.shape)}")
                if self.top_k > v.shape[-1]:
                    raise ValueError(f"top_k={self.top_k} is larger than the number of classes {v.shape[-1]}")
                if self.logits_shape is None:
                    self.logits_shape = tuple(v.shape[1:])
                elif tuple(v.shape[1:]) != self.logits_shape:
                    raise ValueError(f"teacher output 'logits' has per-sample shape {tuple(v.shape[1:])} in the "
                                     f"{where} but {self.logits_shape} before; the cache stores one shape per key "
                                     "(pad to a fixed length)")
                values, classes = v.topk(self.top_k, dim=-1)
                stored[TOPK_VALUES] = self._convert(TOPK_VALUES, values)
                stored[TOPK_INDICES] = classes.to("cpu", torch.int32)
            else:
                stored[k] = self._convert(k, v)
        if self.keys is None:
            self.keys = keys
            self._create(stored)
        for k, v in stored.items():
            entry = self.entries[k]
            if list(v.shape[1:]) != entry["shape"][1:]:
                raise ValueError(f"teacher output {k!r} has per-sample shape {tuple(v.shape[1:])} in the {where} but "
                                 f"{tuple(entry['shape'][1:])} before; the cache stores one shape per key (pad to a "
                                 "fixed length)")
            arr = self.arrays[k]
            if b and idx[-1] - idx[0] == b - 1 and bool(np.all(np.diff(idx) == 1)):
                arr[idx[0]:idx[0] + b] = v.numpy()  # the index-order build: contiguous rows
            else:
                arr[idx] = v.numpy()
        self.rows += b

    def _convert(self, key: str, v: torch.Tensor) -> torch.Tensor:
        if not v.is_floating_point():
            return v.cpu()
        out = v.to("cpu", self.dtype)
        if self.dtype == torch.float16:
            overflow = torch.isinf(out) & torch.isfinite(v.cpu())
            if bool(overflow.any()):
                worst = v[torch.isfinite(v)].abs().max().item()
                raise ValueError(f"teacher output {key!r} overflows float16 (|value| up to {worst:.4g} > 65504); "
                                 "build the cache with dtype=torch.float32")
        return out

    def _create(self, stored: dict[str, torch.Tensor]) -> None:
        for i, (k, v) in enumerate(stored.items()):
            name = f"{i:03d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', k)[:80]}.bin"
            path = os.path.join(self.directory, name)
            shape = (self.n, *v.shape[1:])
            np_dtype = v.numpy().dtype
            nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
            if os.path.lexists(path):
                os.remove(path)  # unlink, never truncate: a cache still open on the old file keeps working
            self.created.append(path)
            if nbytes:
                self.arrays[k] = np.memmap(path, dtype=np_dtype, mode="w+", shape=shape)
            else:
                open(path, "wb").close()
                self.arrays[k] = np.zeros(shape, dtype=np_dtype)
            self.entries[k] = {"file": name, "shape": list(shape), "dtype": np_dtype.name, "nbytes": nbytes}

    def finish(self, fingerprint: str) -> dict:
        if self.keys is None:
            raise ValueError("the build loader yielded no batches: there is nothing to cache")
        if self.rows != self.n:
            raise RuntimeError(f"the build wrote {self.rows} rows for a dataset of {self.n} samples")
        for k, arr in self.arrays.items():
            if isinstance(arr, np.memmap):
                arr.flush()
        for path in self.created:
            _fsync(path)
        self.arrays.clear()
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "num_samples": self.n, "fingerprint": fingerprint,
            "dtype": _dtype_name(self.dtype), "top_k": self.top_k, "keys": list(self.keys),
            "tensors": self.entries, "storage": "raw C-order arrays (numpy.memmap layout), no header",
            "torch_version": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if self.top_k is not None:
            manifest["logits_shape"] = list(self.logits_shape)
            manifest["num_classes"] = self.logits_shape[-1]
        elif LOGITS in self.entries and len(self.entries[LOGITS]["shape"]) > 1:
            manifest["num_classes"] = self.entries[LOGITS]["shape"][-1]
        return manifest

    def abort(self) -> None:
        self.arrays.clear()
        for path in self.created:
            try:
                os.remove(path)
            except OSError:
                pass


def _remove_old_cache(directory: str) -> None:
    """Remove an existing cache: the manifest first (so it can never describe half-written files),
    then the data files it lists."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            old = json.load(f)
        files = [t["file"] for t in old.get("tensors", {}).values()]
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        files = []
    if os.path.lexists(path):
        os.remove(path)
    for name in files:
        p = os.path.join(directory, os.path.basename(str(name)))
        if os.path.isfile(p):
            os.remove(p)


# -- reading helpers -----------------------------------------------------------------------------

def _read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise CacheMismatchError(f"no teacher cache at {directory}: the directory does not exist")
    if not os.path.isfile(path):
        raise CacheMismatchError(f"no teacher cache at {directory}: {MANIFEST} is missing (expected a complete "
                                 "cache; a build that did not finish leaves no manifest)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CacheMismatchError(f"teacher cache at {directory}: {MANIFEST} is corrupt ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CacheMismatchError(f"teacher cache at {directory}: {MANIFEST} is corrupt or not a teacher cache "
                                 f"manifest (format: expected {FORMAT!r}, found {found!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise CacheMismatchError(f"teacher cache at {directory}: format version: expected {FORMAT_VERSION}, found "
                                 f"{manifest.get('version')!r}")
    try:
        n = manifest["num_samples"]
        assert isinstance(n, int) and n > 0
        assert isinstance(manifest["fingerprint"], str)
        assert manifest["dtype"] in _DTYPES
        k = manifest["top_k"]
        assert k is None or (isinstance(k, int) and k > 0)
        tensors = manifest["tensors"]
        assert isinstance(tensors, dict) and tensors
        for key, t in tensors.items():
            assert isinstance(t["file"], str) and os.path.basename(t["file"]) == t["file"]
            assert isinstance(t["shape"], list) and t["shape"] and t["shape"][0] == n
            np.dtype(t["dtype"])
            assert t["nbytes"] == int(np.prod(t["shape"], dtype=np.int64)) * np.dtype(t["dtype"]).itemsize
        if k is not None:
            assert TOPK_VALUES in tensors and TOPK_INDICES in tensors and isinstance(manifest["num_classes"], int)
    except (AssertionError, KeyError, TypeError, ValueError) as e:
        raise CacheMismatchError(f"teacher cache at {directory}: {MANIFEST} is corrupt (missing or invalid field"
                                 f"{': ' + repr(e.args[0]) if isinstance(e, KeyError) else ''})") from None
    for key, t in tensors.items():
        p = os.path.join(directory, t["file"])
        if not os.path.isfile(p):
            raise CacheMismatchError(f"teacher cache at {directory}: the data file {t['file']!r} of {key!r} is missing")
        size = os.path.getsize(p)
        if size != t["nbytes"]:
            raise CacheMismatchError(f"teacher cache at {directory}: the data file {t['file']!r} of {key!r} has "
                                     f"{size} bytes, expected {t['nbytes']} (truncated or overwritten)")
    return manifest


def _map_arrays(directory: str, manifest: dict) -> dict[str, np.ndarray]:
    arrays = {}
    for key, t in manifest["tensors"].items():
        shape, dtype = tuple(t["shape"]), np.dtype(t["dtype"])
        if t["nbytes"] == 0:  # mmap cannot map an empty file
            arrays[key] = np.zeros(shape, dtype=dtype)
        else:
            arrays[key] = np.memmap(os.path.join(directory, t["file"]), dtype=dtype, mode="r", shape=shape)
    return arrays


def _lookup_keys(manifest: dict) -> list[str]:
    stored = list(manifest["tensors"])
    if manifest["top_k"] is None:
        return stored
    return [LOGITS, TOPK_VALUES, TOPK_INDICES] + [k for k in stored if k not in _RESERVED]


def _check_indices(indices: Any, n: int) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        idx = indices.detach().cpu().numpy()
    else:
        idx = np.asarray(indices)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"indices must be integers, got {idx.dtype}")
    if idx.ndim != 1:
        raise ValueError(f"indices must be 1-D (one sample index per row), got shape {tuple(idx.shape)}")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = int(idx[(idx < 0) | (idx >= n)][0])
        raise IndexError(f"sample index {bad} is out of range for a teacher cache of {n} samples")
    return idx


def _check_dtype(dtype: Union[torch.dtype, str]) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.replace("torch.", ""), dtype)
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"dtype must be torch.float16 or torch.float32, got {dtype!r}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_top_k(top_k: Any) -> Optional[int]:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    return top_k


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(obj: Any, path: str) -> None:
    """Write JSON atomically (temporary file, fsync, rename), then fsync the directory."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)
    _fsync(os.path.dirname(os.path.abspath(path)))
