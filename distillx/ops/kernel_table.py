"""The one table of the built-in kernel functions of KFD/SP and MMD: names, formulas, the codes the
C++ panel kernels use, and every parameter with its default and its check.

Everything that names a kernel reads it from here: the fused and reference losses
(:mod:`distillx.ops.kernel_gram`, :mod:`distillx.ops.reference`), the kernel methods' options
(:mod:`distillx.methods.kfd`) and the registry entries of the built-in kernels plugin
(:mod:`distillx.kernels`). ``x̃ = x / scale`` for Chebyshev, ``D`` the feature width.
"""
from __future__ import annotations

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


__all__ = ["KERNELS", "PARAMS", "KernelSpec", "KernelParam", "is_builtin", "check_kernel", "check_params"]
