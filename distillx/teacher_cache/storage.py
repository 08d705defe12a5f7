"""On-disk format of the teacher cache: raw memory-mapped arrays plus ``manifest.json`` written last."""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any, Optional, Union

import numpy as np
import torch

from .. import _checks
from .._atomic import atomic_open

FORMAT = "distillx.teacher_cache"
FORMAT_VERSION = 2  # 2: the inputs' hash, the teacher's code in the fingerprint
MANIFEST = "manifest.json"
LOGITS = "logits"
TOPK_VALUES = "topk_values"
TOPK_INDICES = "topk_indices"
_RESERVED = (TOPK_VALUES, TOPK_INDICES)
_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# The names of the data files a build creates (``_Writer._create``): the only files a rebuild deletes.
_DATA_FILE = re.compile(r"[0-9]{3}-[A-Za-z0-9_.-]{1,80}\.bin")


class CacheMismatchError(ValueError):
    """The cache directory does not hold a complete cache matching what was expected; the message
    names what does not match (expected vs found)."""


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
    then the data files it lists. Only a teacher cache's manifest (its ``format``) is trusted, and of
    what it lists only plain files named like the build's data files (``NNN-<key>.bin``) in
    ``directory`` itself are deleted: a foreign or edited manifest cannot make a rebuild delete
    anything else. A manifest of another format is left in place and the build stops, naming it."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.lexists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None  # unreadable: our own manifest interrupted mid-write is never seen (atomic), so nothing to trust
    if isinstance(old, dict) and old.get("format") not in (None, FORMAT):
        raise ValueError(f"{path} is a {old.get('format')!r} manifest, not a teacher cache's: the cache will not "
                         "replace it; choose another cache directory")
    tensors = old.get("tensors") if isinstance(old, dict) and old.get("format") == FORMAT else None
    files = [t.get("file") for t in tensors.values() if isinstance(t, dict)] if isinstance(tensors, dict) else []
    os.remove(path)
    for name in files:
        if isinstance(name, str) and _DATA_FILE.fullmatch(name):
            p = os.path.join(directory, name)
            if os.path.isfile(p) and not os.path.islink(p):
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
        assert isinstance(manifest["inputs"], str)
        assert manifest["dtype"] in _DTYPES
        k = manifest["top_k"]
        assert k is None or (isinstance(k, int) and k > 0)
        tensors = manifest["tensors"]
        assert isinstance(tensors, dict) and tensors
        for key, t in tensors.items():
            assert isinstance(t["file"], str) and _DATA_FILE.fullmatch(t["file"])
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


def _check_dtype(dtype: Union[torch.dtype, str]) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.replace("torch.", ""), dtype)
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"dtype must be torch.float16 or torch.float32, got {dtype!r}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_top_k(top_k: Any) -> Optional[int]:
    return _checks.integer("top_k", top_k, ge=1, optional=True)


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
