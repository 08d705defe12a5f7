"""Load the compiled core ``distillx._C`` and the CPU kernels for this CPU's vector ISA.

``distillx._C`` registers the ``distillx::*`` operators (and the CUDA kernels) with PyTorch's
dispatcher when it is imported. The CPU kernels are built once per vector ISA into
``distillx/_cpu_<isa>*.so`` (``default``, ``avx2``, ``avx512`` on x86-64); the best one that was built
and that the CPU runs is loaded, as ATen picks its own kernels: by
``torch.backends.cpu.get_cpu_capability()``, capped by ``DISTILLX_CPU_CAPABILITY`` (default, avx2
or avx512) where set. One ISA library per process, never two.

If ``_C`` is missing (source checkout without a build, or an incompatible torch), distillx warns once
and every op runs its pure-PyTorch reference from :mod:`distillx.ops.reference`; without a CPU
library for this CPU, the CPU ops do (with a warning that says why).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import os
import warnings

import torch

_C = None
_ERROR: str | None = None
_WARNED = False
ISAS = ("default", "avx2", "avx512")  # rising order
CAPABILITY_ENV = "DISTILLX_CPU_CAPABILITY"
_CPU_ISA: str | None = None
_CPU_ERROR: str | None = None
_FOLDER = os.path.dirname(os.path.abspath(__file__))


def isa_candidates(capability: str, cap: str | None = None) -> list[str]:
    """The ISA libraries worth trying, best first, for torch's CPU ``capability`` string ("AVX512",
    "AVX2", "DEFAULT", or another platform's name) under the user's ``cap`` (DISTILLX_CPU_CAPABILITY)."""
    top = {"avx512": 2, "avx2": 1}.get(str(capability).lower(), 0)
    if cap is not None and cap.strip():
        wanted = cap.strip().lower()
        if wanted not in ISAS:
            raise ValueError(f"{CAPABILITY_ENV} must be one of {', '.join(ISAS)}, got {cap!r}")
        top = min(top, ISAS.index(wanted))
    return list(reversed(ISAS[:top + 1]))


def isa_library(isa: str) -> str | None:
    """Path of the built CPU kernel library for ``isa``, or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_FOLDER, f"_cpu_{isa}{suffix}")
        if os.path.isfile(path):
            return path
    return None


def built_isas() -> list[str]:
    """The ISAs whose CPU kernel library this build made and installed. A library of an ISA that the
    loaded ``_C`` was not built with (left over from an earlier build with another
    ``DISTILLX_CPU_ISAS``) is stale: it is never listed, so never loaded."""
    made = str(build_info().get("cpu_isas", "")).split(",")
    return [isa for isa in ISAS if isa in made and isa_library(isa)]


def _load_cpu() -> None:
    global _CPU_ISA, _CPU_ERROR
    capability = torch.backends.cpu.get_cpu_capability()
    built = built_isas()
    for isa in isa_candidates(capability, os.environ.get(CAPABILITY_ENV)):
        path = isa_library(isa) if isa in built else None
        if path is None:
            continue
        try:
            torch.ops.load_library(path)
        except OSError as exc:
            _CPU_ERROR = f"{os.path.basename(path)} failed to load ({exc})"
            return
        _CPU_ISA = isa
        return
    cap = os.environ.get(CAPABILITY_ENV)
    _CPU_ERROR = (f"no CPU kernel library for this CPU (capability {capability}"
                  + (f", {CAPABILITY_ENV}={cap}" if cap else "")
                  + f"; built: {', '.join(built) or 'none'})")


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
    _load_cpu()


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


def cpu_isa() -> str | None:
    """The ISA of the loaded CPU kernels (None when none is loaded; :func:`cpu_error` says why)."""
    return _CPU_ISA


def cpu_error() -> str | None:
    """Why no CPU kernel library is loaded (None when one is, or when ``_C`` itself is missing)."""
    return _CPU_ERROR


def build_info() -> dict:
    """Versions and backends the extension was built with (empty when it is missing)."""
    return dict(_C.build_info()) if _C is not None else {}


_load()  # at the end: _load_cpu reads build_info
