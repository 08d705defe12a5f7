"""Built-in kernel functions, registered as a plugin (``distillx.kernels``).

The plugin manager registers this module before any third-party plugin, and it adds the five
built-in kernels through the same ``distillx_register_kernels`` hook a third-party plugin uses, so
``distillx plugins`` lists them with their provider and a plugin that registers a taken name gets
an error naming both (or replaces it deliberately with ``override=True``).

Each entry is a :class:`BuiltinKernel`: a small descriptor (name, parameters with their defaults,
formula) that is also callable as ``k(x, z, **params) -> (N, M)``, the reference definition
(:func:`distillx.ops.reference.kernel_matrix`). The losses (:func:`distillx.functional.kernel_gram_loss`,
:func:`~distillx.functional.mmd_loss`) recognise built-in names themselves and run their fused
formulations; kernels registered by other plugins are callables ``k(x, z)`` run on the reference path.

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

from .plugin.hookspecs import hookimpl


@dataclass(frozen=True)
class BuiltinKernel:
    """A built-in kernel: ``name``, its parameters with their defaults, and its formula."""

    name: str
    formula: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, x, z, **params):
        """The (N, M) kernel matrix of the rows of ``x`` (N, D) and ``z`` (M, D) (reference definition)."""
        from .ops.reference import kernel_matrix

        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for kernel {self.name!r}; it takes "
                             f"{list(self.params) or 'none'}")
        return kernel_matrix(x, z, self.name, **params)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"BuiltinKernel({self.name!r}: {self.formula}{'; ' + params if params else ''})"


BUILTIN_KERNELS = MappingProxyType({k.name: k for k in (
    BuiltinKernel("linear", "<x, z>"),
    BuiltinKernel("polynomial", "(<x, z>/D + coef0)^degree", {"degree": 2, "coef0": 1.0}),
    BuiltinKernel("rbf", "exp(-|x - z|^2 / (2 sigma2)), sigma2=None: mean pairwise squared distance",
                  {"sigma2": None}),
    BuiltinKernel("chebyshev", "(1/D) sum_i<=order <T_i(x~), T_i(z~)> / sqrt(1 - <x~, z~>/D + eps), "
                               "x~ = x / max|x|", {"order": 3, "eps": 1e-3}),
    BuiltinKernel("cosine", "<x, z> / (|x| |z|)"),
)})
"""name -> :class:`BuiltinKernel` for the five built-in kernels (read-only)."""


@hookimpl
def distillx_register_kernels(registry):
    for name, kernel in BUILTIN_KERNELS.items():
        registry.add(name, kernel)


__all__ = ["BuiltinKernel", "BUILTIN_KERNELS"]
