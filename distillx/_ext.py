"""Load the compiled core ``distillx._C``.

The extension registers the ``distillx::*`` operators with PyTorch's dispatcher when it is imported.
If it is missing (source checkout without a build, or an incompatible torch), distillx warns once and
every op runs its pure-PyTorch reference from :mod:`distillx.ops.reference`.
"""
from __future__ import annotations

import importlib
import warnings

import torch

_C = None
_ERROR: str | None = None
_WARNED = False


def _load():
    global _C, _ERROR
    try:
        _C = importlib.import_module("distillx._C")
    except ImportError as exc:  # missing build or ABI mismatch: fall back to references
        _C, _ERROR = None, str(exc)
        return
    built_cuda = _C.build_info().get("cuda_version")
    if built_cuda and torch.version.cuda and built_cuda.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise RuntimeError(
            f"distillx was compiled with CUDA {built_cuda} but torch uses CUDA {torch.version.cuda}; "
            "reinstall distillx against this torch: pip install --no-build-isolation --force-reinstall ."
        )


_load()


def available() -> bool:
    """True when the compiled kernels are loaded."""
    return _C is not None


def warn_missing_once() -> None:
    """Warn (once per process) that the reference implementations are serving the ops."""
    global _WARNED
    if _C is None and not _WARNED:
        _WARNED = True
        warnings.warn(
            f"distillx._C is not available ({_ERROR}); running the pure-PyTorch reference ops. "
            "Build it with: pip install --no-build-isolation .",
            RuntimeWarning,
            stacklevel=3,
        )


def build_info() -> dict:
    """Versions and backends the extension was built with (empty when it is missing)."""
    return dict(_C.build_info()) if _C is not None else {}
