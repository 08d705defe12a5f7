"""distillx-example-plugin: adds the ``cosine_logits`` distillation method to distillx.

This module is the plugin object named by the ``distillx`` entry point in pyproject.toml; distillx
imports it when it builds its plugin manager (never at ``import distillx``) and calls the hooks below.
"""
from __future__ import annotations

from distillx.plugin import hookimpl

from .cosine import CosineLogits

__version__ = "0.1.0"


@hookimpl
def distillx_register_methods(registry):
    registry.add(CosineLogits.name, CosineLogits)


__all__ = ["CosineLogits", "distillx_register_methods"]
