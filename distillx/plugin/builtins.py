"""The built-in plugins: distillx's own methods, weight transfers, kernels and augmentations reach
the registries through the same hooks as any third-party plugin, registered first, under the names
``distillx.methods``, ``distillx.transfer``, ``distillx.kernels``, ``distillx.augment`` and
``distillx.loggers``.
"""
from __future__ import annotations

from ..augment import BUILTIN_AUGMENTATIONS
from ..kernels import BUILTIN_KERNELS
from ..loggers import BUILTIN_LOGGERS
from ..methods import BUILTIN_METHODS
from ..transfer import BUILTIN_TRANSFERS
from .hookspecs import hookimpl


class BuiltinPlugin:
    """One built-in plugin: ``name`` (its plugin name) and the module whose objects it registers."""

    def __init__(self, name: str, module: str):
        self.name, self.module = name, module

    def __repr__(self) -> str:
        return f"<built-in plugin {self.name}>"


class _Methods(BuiltinPlugin):
    @hookimpl
    def distillx_register_methods(self, registry):
        for cls in BUILTIN_METHODS:
            registry.add(cls.name, cls)


class _Transfers(BuiltinPlugin):
    @hookimpl
    def distillx_register_weight_transfers(self, registry):
        for name, strategy in BUILTIN_TRANSFERS.items():
            registry.add(name, strategy)


class _Kernels(BuiltinPlugin):
    @hookimpl
    def distillx_register_kernels(self, registry):
        for name, kernel in BUILTIN_KERNELS.items():
            registry.add(name, kernel)


class _Augmentations(BuiltinPlugin):
    @hookimpl
    def distillx_register_augmentations(self, registry):
        for name, cls in BUILTIN_AUGMENTATIONS.items():
            registry.add(name, cls)


class _Loggers(BuiltinPlugin):
    @hookimpl
    def distillx_register_loggers(self, registry):
        for name, factory in BUILTIN_LOGGERS.items():
            registry.add(name, factory)


#: The built-in plugins in registration order.
BUILTIN_PLUGINS = (_Methods("distillx.methods", "distillx.methods"),
                   _Transfers("distillx.transfer", "distillx.transfer"),
                   _Kernels("distillx.kernels", "distillx.kernels"),
                   _Augmentations("distillx.augment", "distillx.augment"),
                   _Loggers("distillx.loggers", "distillx.loggers"))

__all__ = ["BUILTIN_PLUGINS", "BuiltinPlugin"]
