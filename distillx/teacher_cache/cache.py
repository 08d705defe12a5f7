"""The teacher cache: build it once (teacher over the dataset in index order), open it, look samples up."""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import _checks
from ..engine.batches import LABELS, call_model, logits_of, split_indexed, to_device
from ..engine.training import resolve_device
from .fingerprint import inputs_fingerprint, teacher_fingerprint, update_inputs
from .indexed import _check_loader, build_loader
from .storage import (
    _DTYPES,
    LOGITS,
    MANIFEST,
    TOPK_INDICES,
    TOPK_VALUES,
    CacheMismatchError,
    _check_dtype,
    _check_top_k,
    _dtype_name,
    _lookup_keys,
    _map_arrays,
    _read_manifest,
    _remove_old_cache,
    _write_json_atomic,
    _Writer,
)

log = logging.getLogger(__name__)
_UNSET = object()


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
              batch_size: Optional[int] = None, label_key: str = LABELS) -> "TeacherCache":
        """Run ``teacher`` once over ``loader.dataset`` (index order) and store its outputs in ``directory``.

        Args:
            teacher: the teacher; run in ``eval()`` mode (every submodule's mode is restored
                afterwards) under ``torch.no_grad()``. It is not moved.
            loader: a DataLoader over a map-style dataset with ``(inputs, targets)`` or mapping items
                (``label_key`` is left out of the teacher's inputs); its batch size, collate function
                and worker options are reused (not its sampler or ``drop_last``: every sample is
                cached, in index order). Token features need one sequence length in every batch.
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
                The inputs' hash (:func:`inputs_fingerprint`) is computed as the batches pass and
                stored beside it, whatever the fingerprint.
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
        batches = build_loader(loader, dataset, batch_size)
        directory = os.path.abspath(os.fspath(directory))
        os.makedirs(directory, exist_ok=True)
        _remove_old_cache(directory)

        writer = _Writer(directory, n, store_dtype, top_k)
        inputs_hash = hashlib.sha256(b"inputs\0")  # what inputs_fingerprint computes, in the same pass
        modes = [(m, m.training) for m in teacher.modules()]
        t0 = time.perf_counter()
        try:
            teacher.eval()
            with torch.no_grad():
                for batch in batches:
                    update_inputs(inputs_hash, batch, label_key)
                    indices, inputs, _ = split_indexed(batch, label_key)
                    inputs = to_device(inputs, device)
                    if capture is None:
                        outputs = {LOGITS: logits_of(call_model(teacher, inputs, "teacher"), "teacher")}
                    else:
                        outputs = capture(inputs)
                    writer.write(indices, outputs)
            manifest = writer.finish(fingerprint)
            manifest["inputs"] = inputs_hash.hexdigest()
        except BaseException:
            writer.abort()
            raise
        finally:
            for m, mode in modes:
                m.training = mode
        manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
        manifest["batch_size"] = batches.batch_size
        _write_json_atomic(manifest, os.path.join(directory, MANIFEST))  # last: the cache now exists
        log.info("built teacher cache at %s: %d samples, keys %s, %.1f MB", directory, n,
                 list(manifest["tensors"]), sum(t["nbytes"] for t in manifest["tensors"].values()) / 1e6)
        return cls(directory, manifest, was_built=True)

    @classmethod
    def open(cls, directory: Union[str, os.PathLike], *, expect_fingerprint: Optional[str] = None,
             expect_len: Optional[int] = None, expect_dtype: Union[None, torch.dtype, str] = None,
             expect_top_k: Any = _UNSET, expect_keys: Optional[Iterable[str]] = None,
             expect_inputs: Optional[str] = None) -> "TeacherCache":
        """Reopen the cache in ``directory`` (nothing is loaded: the data files are memory-mapped).

        Raises :class:`CacheMismatchError` naming the problem when the manifest is missing or
        corrupt, a data file is missing or has the wrong size, or the cache differs from an
        ``expect_*`` value given: fingerprint, number of samples, storage dtype, ``top_k`` (None
        means dense logits), keys (each must be available from :meth:`lookup`) or the inputs' hash
        (:func:`inputs_fingerprint` of the loader).
        """
        directory = os.path.abspath(os.fspath(directory))
        manifest = _read_manifest(directory)
        problems = []
        if expect_len is not None and int(expect_len) != manifest["num_samples"]:
            problems.append(f"number of samples: expected {int(expect_len)} (the dataset length), "
                            f"found {manifest['num_samples']}")
        if expect_fingerprint is not None and expect_fingerprint != manifest["fingerprint"]:
            problems.append(f"fingerprint: expected {expect_fingerprint!r}, found {manifest['fingerprint']!r} "
                            "(the teacher's weights or code, the number of samples, what is captured, or the "
                            "caller's fingerprint changed)")
        if expect_inputs is not None and expect_inputs != manifest["inputs"]:
            problems.append("inputs: the dataset's inputs differ from those the cache was built from (another data "
                            "split or preprocessing, or another batch size for padded batches)")
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
                      batch_size: Optional[int] = None, expect_keys: Optional[Iterable[str]] = None,
                      label_key: str = LABELS, verify_inputs: bool = True) -> "TeacherCache":
        """:meth:`open` the cache in ``directory`` if it is complete and matches (fingerprint, as
        :meth:`build` would compute it; dataset length; ``dtype``; ``top_k``; ``expect_keys`` if
        given, e.g. the feature keys ``capture`` returns; the inputs, see below), else :meth:`build`
        it. Replacing a cache that was there is logged as a warning with the reason.

        ``verify_inputs`` (default True): once everything else matches, hash the loader's inputs
        (:func:`inputs_fingerprint`: one pass over the data, no teacher) and rebuild when they are
        not the inputs the cache was built from, e.g. another split of the same size. False trusts
        the fingerprint alone. Other arguments as in :meth:`build`."""
        _checks.boolean("verify_inputs", verify_inputs)
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        dataset = _check_loader(loader)
        n = len(dataset)
        if n == 0:
            raise ValueError("the loader's dataset is empty (0 samples): there is nothing to cache")
        if fingerprint is None:
            fingerprint = teacher_fingerprint(teacher, n)
        try:
            cache = cls.open(directory, expect_fingerprint=fingerprint, expect_len=n, expect_dtype=dtype,
                             expect_top_k=top_k, expect_keys=expect_keys)
            if verify_inputs:
                cls.open(directory, expect_inputs=inputs_fingerprint(loader, batch_size=batch_size,
                                                                     label_key=label_key))
            return cache
        except CacheMismatchError as e:
            existed = os.path.isfile(os.path.join(os.fspath(directory), MANIFEST))
            (log.warning if existed else log.info)("%s the teacher cache: %s", "replacing" if existed else "building", e)
        return cls.build(teacher, loader, directory, capture=capture, dtype=dtype, top_k=top_k, device=device,
                         fingerprint=fingerprint, batch_size=batch_size, label_key=label_key)

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
