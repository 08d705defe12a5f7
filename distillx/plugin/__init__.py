"""distillx's plugin layer: hooks, registries and the (lazily built) plugin manager.

Importing this package loads no plugin. The manager, and with it every registry, is built on the
first call to :func:`get_plugin_manager`, :func:`get_registries` or :func:`method`.

Writing a plugin: see :mod:`distillx.plugin.hookspecs`. Using one::

    import distillx as dx
    kd = dx.method("kd", T=4.0, weight=0.9)
    dx.plugin.get_registries().methods.names()      # every registered method
"""
from __future__ import annotations

from typing import Any

from .hookspecs import hookimpl, hookspec
from .manager import (
    DistillxPluginManager,
    FailedPlugin,
    PluginInfo,
    PluginLoadWarning,
    get_plugin_manager,
    get_registries,
    reset_plugins,
)
from .registry import DuplicateNameError, Entry, Registries, Registry, UnknownNameError


def method(name: str, **options: Any):
    """Build the registered distillation method ``name`` with ``options``.

    >>> dx.method("kd", T=2.0, divergence="jsd", weight=0.5)    # doctest: +SKIP

    Raises :class:`UnknownNameError` (a ``KeyError`` and ``ValueError``) listing the registered
    methods for an unknown ``name``, and ``TypeError`` naming the option and the valid ones for an
    unknown option.
    """
    return get_registries().methods.get(name)(**options)


__all__ = [
    "hookimpl", "hookspec", "method",
    "get_plugin_manager", "get_registries", "reset_plugins",
    "Registry", "Registries", "Entry", "DuplicateNameError", "UnknownNameError",
    "DistillxPluginManager", "PluginInfo", "FailedPlugin", "PluginLoadWarning",
]
