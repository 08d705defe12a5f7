"""The built-in kernel functions as registry entries (``distillx.kernels``).

The plugin manager registers :data:`BUILTIN_KERNELS` as the built-in plugin ``distillx.kernels``
(:mod:`distillx.plugin.builtins`) before any third-party plugin, through the same
``distillx_register_kernels`` hook a third-party plugin uses, so ``distillx plugins`` lists them with
their provider and a plugin that registers a taken name gets an error naming both (or replaces it
deliberately with ``override=True``).

Each entry is a :class:`BuiltinKernel`: a descriptor of a row of the kernel table
(:mod:`distillx.ops.kernel_table`: name, parameters with their defaults, formula) that is also
callable as ``k(x, z, **params) -> (N, M)``, the reference definition
(:func:`distillx.ops.reference.kernel_matrix`). The losses run built-in names on their fused
formulations; kernels registered by other plugins are callables ``k(x, z)`` run on the reference
path (:func:`distillx.method` and :func:`distillx.plugin.kernel` look them up by name).

A third-party kernel::

    from distillx.plugin import hookimpl

    @hookimpl
    def distillx_register_kernels(registry):
        registry.add("laplacian", lambda x, z: torch.exp(-torch.cdist(x, z, p=1)))

    dx.method("kfd", kernel="laplacian")
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .ops.kernel_table import KERNELS
from .ops.reference import kernel_matrix


@dataclass(frozen=True)
class BuiltinKernel:
    """A built-in kernel: ``name``, its parameters with their defaults, and its formula."""

    name: str
    formula: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, x, z, **params):
        """The (N, M) kernel matrix of the rows of ``x`` (N, D) and ``z`` (M, D) (reference definition)."""
        return kernel_matrix(x, z, self.name, **params)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"BuiltinKernel({self.name!r}: {self.formula}{'; ' + params if params else ''})"


BUILTIN_KERNELS = MappingProxyType({name: BuiltinKernel(name, spec.formula, spec.defaults)
                                    for name, spec in KERNELS.items()})
"""name -> :class:`BuiltinKernel` for the built-in kernels (read-only)."""

__all__ = ["BuiltinKernel", "BUILTIN_KERNELS"]
