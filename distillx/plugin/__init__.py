"""distillx's plugin layer: hooks, registries and the (lazily built) plugin manager.

Importing this package loads no plugin. The manager, and with it every registry, is built on the
first call to :func:`get_plugin_manager`, :func:`get_registries` or a resolver (:func:`method`,
:func:`transfer`, :func:`augmentation`, :func:`kernel`, :func:`logger`; :mod:`distillx.plugin.resolve`).

Writing a plugin: see :mod:`distillx.plugin.hookspecs`. Using one::

    import distillx as dx
    kd = dx.method("kd", T=4.0, weight=0.9)
    dx.plugin.get_registries().methods.names()      # every registered method
"""
from __future__ import annotations

from .hookspecs import hookimpl, hookspec
from .manager import (
    DistillxPluginManager,
    FailedPlugin,
    PluginInfo,
    PluginLoadWarning,
    get_plugin_manager,
    get_registries,
    provenance,
    reset_plugins,
)
from .registry import DuplicateNameError, Entry, Registries, Registry, UnknownNameError
from .resolve import augmentation, kernel, logger, method, resolve_augmentation, transfer

__all__ = [
    "hookimpl", "hookspec", "method", "transfer", "augmentation", "resolve_augmentation", "kernel", "logger",
    "get_plugin_manager", "get_registries", "reset_plugins", "provenance",
    "Registry", "Registries", "Entry", "DuplicateNameError", "UnknownNameError",
    "DistillxPluginManager", "PluginInfo", "FailedPlugin", "PluginLoadWarning",
]
