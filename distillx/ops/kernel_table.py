"""The one table of the built-in kernel functions of KFD/SP and MMD: names, formulas, the codes the
C++ panel kernels use, and every parameter with its default and its check.

Everything that names a kernel reads it from here: the fused and reference losses
(:mod:`distillx.ops.kernel_gram`, :mod:`distillx.ops.reference`), the kernel methods' options
(:mod:`distillx.methods.kfd`) and the registry entries of the built-in kernels plugin
(:mod:`distillx.kernels`). ``x̃ = x / scale`` for Chebyshev, ``D`` the feature width.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

import torch

from .. import _checks


def _data_or(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """``None`` (computed from the batch) or a tensor (a data-dependent value, the caller's business)
    pass; anything else goes through ``check``."""
    def checked(name: str, value: Any) -> Any:
        return value if value is None or isinstance(value, torch.Tensor) else check(name, value)
    return checked


@dataclass(frozen=True)
class KernelParam:
    name: str
    default: Any
    check: Callable[[str, Any], Any]
    doc: str


@dataclass(frozen=True)
class KernelSpec:
    """A built-in kernel. ``code`` is its number in ``csrc/include/distillx/kernel_gram.h`` (None:
    computed through feature-space identities, never by the panel kernels)."""

    name: str
    formula: str
    code: Optional[int]
    params: tuple = ()

    @property
    def defaults(self) -> dict:
        return {p.name: p.default for p in self.params}


_POSITIVE = _data_or(_checks.positive)
KERNELS: Mapping[str, KernelSpec] = MappingProxyType({k.name: k for k in (
    KernelSpec("linear", "<x, z>", 0),
    KernelSpec("polynomial", "(<x, z>/D + coef0)^degree", 1, (
        KernelParam("degree", 2, lambda n, v: _checks.integer(n, v, ge=1), "integer power, >= 1"),
        KernelParam("coef0", 1.0, _checks.finite, "additive constant c"))),
    KernelSpec("rbf", "exp(-|x - z|^2 / (2 sigma2))", 2, (
        KernelParam("sigma2", None, _POSITIVE, "bandwidth; None: the mean pairwise squared distance of the rows"),)),
    KernelSpec("chebyshev", "(1/D) sum_i<=order <T_i(x~), T_i(z~)> / sqrt(1 - <x~, z~>/D + eps)", 3, (
        KernelParam("order", 3, lambda n, v: _checks.integer(n, v, ge=1), "highest polynomial T_order, >= 1"),
        KernelParam("eps", 1e-3, _POSITIVE, "keeps the denominator away from 0"),
        KernelParam("scale", None, _POSITIVE, "x~ = x / scale; None: max|x| over the batch (detached)"))),
    KernelSpec("cosine", "<x, z> / (|x| |z|)", None),
)})
"""name -> :class:`KernelSpec` of every built-in kernel (read-only)."""

PARAMS: Mapping[str, tuple] = MappingProxyType({
    p.name: tuple(k.name for k in KERNELS.values() if p.name in k.defaults)
    for spec in KERNELS.values() for p in spec.params})
"""parameter name -> the built-in kernels that take it."""


def is_builtin(kernel: Any) -> bool:
    return isinstance(kernel, str) and kernel in KERNELS


def check_kernel(kernel: Any) -> Any:
    """A built-in kernel name or a callable ``k(x, z) -> (N, M)``; anything else is an error."""
    if is_builtin(kernel) or callable(kernel):
        return kernel
    if isinstance(kernel, str):
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)} or a callable k(x, z); got {kernel!r} "
                         "(a kernel registered by a plugin is looked up by name in distillx.method(...), or with "
                         "distillx.plugin.kernel(name))")
    raise TypeError(f"kernel must be a name or a callable k(x, z), got {type(kernel).__name__}")


def check_params(kernel: str, params: Mapping[str, Any]) -> dict:
    """Validated parameters of built-in ``kernel`` merged over its defaults; an unknown parameter is
    an error listing the ones it takes."""
    spec = KERNELS[kernel]
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for kernel {kernel!r}; it takes "
                         f"{list(spec.defaults) or 'none'}")
    checked = spec.defaults
    for p in spec.params:
        if params.get(p.name) is not None:
            checked[p.name] = p.check(p.name, params[p.name])
    return checked


class NamedKernel:
    """A kernel callable with the name it was registered under (:func:`distillx.plugin.kernel` returns
    a plugin's kernel so), so that an error about its result names it; calls it unchanged."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn

    def __call__(self, x, z, **params):
        return self.fn(x, z, **params)

    def __repr__(self) -> str:
        return f"NamedKernel({self.name!r}, {_callable_name(self.fn)})"


def _callable_name(fn: Any) -> str:
    """``fn``'s ``__qualname__`` (a lambda's with where it was defined; a partial's function's)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    code = getattr(fn, "__code__", None)
    if name.endswith("<lambda>") and code is not None:
        name += f" (defined at {os.path.basename(code.co_filename)}:{code.co_firstlineno})"
    return name


def kernel_label(kernel: Any) -> str:
    """How errors name a kernel callable: ``kernel '<registered name>' (<qualname>)`` for a registered one,
    else ``kernel <qualname>``."""
    while isinstance(kernel, functools.partial):
        kernel = kernel.func
    if isinstance(kernel, NamedKernel):
        return f"kernel {kernel.name!r} ({_callable_name(kernel.fn)})"
    return f"kernel {_callable_name(kernel)}"


def kernel_result(kernel: Callable, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``kernel(x, z)``, checked to be what every loss needs of a kernel: a floating-point tensor of shape
    (N, M) for ``x`` of N rows and ``z`` of M rows. Anything else (a sum, a vector, an extra column, an
    int or non-tensor result) would broadcast or reduce into a loss that trains silently: it is a
    ``TypeError`` (not a floating-point tensor) or ``ValueError`` (shape) naming the kernel
    (:func:`kernel_label`), what it returned and what was expected."""
    out = kernel(x, z)
    expected = (x.shape[0], z.shape[0])
    if isinstance(out, torch.Tensor) and out.is_floating_point() and tuple(out.shape) == expected:
        return out
    if not isinstance(out, torch.Tensor):
        found, error = f"a {type(out).__name__}", TypeError
    elif not out.is_floating_point():
        found, error = f"a tensor of dtype {out.dtype} (shape {tuple(out.shape)})", TypeError
    else:
        found, error = f"a tensor of shape {tuple(out.shape)}", ValueError
    raise error(f"{kernel_label(kernel)} returned {found} for x of {expected[0]} rows and z of {expected[1]} rows; "
                f"expected a floating-point tensor of shape {expected}")


__all__ = ["KERNELS", "PARAMS", "KernelSpec", "KernelParam", "NamedKernel", "is_builtin", "check_kernel",
           "check_params", "kernel_label", "kernel_result"]
