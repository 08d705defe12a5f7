"""Built-in distillation methods.

This module is the built-in methods plugin: the plugin manager registers it (as
``distillx.methods``) before any third-party plugin, and it adds its methods through the same
``distillx_register_methods`` hook a third-party plugin uses. Importing it registers nothing.
"""
from __future__ import annotations

from ..plugin.hookspecs import hookimpl
from .base import FeatureRequest, Method
from .kd import KD

BUILTIN_METHODS = (KD,)


@hookimpl
def distillx_register_methods(registry):
    for cls in BUILTIN_METHODS:
        registry.add(cls.name, cls)


__all__ = ["Method", "FeatureRequest", "KD", "BUILTIN_METHODS"]
