"""distillx-svd: adds the ``svd`` weight transfer to distillx.

This module is the plugin object named by the ``distillx`` entry point in pyproject.toml; distillx
imports it when it builds its plugin manager (never at ``import distillx``) and calls the hook below.
"""
from __future__ import annotations

from distillx.plugin import hookimpl

from .svd import project, svd_transfer

__version__ = "0.1.0"


@hookimpl
def distillx_register_weight_transfers(registry):
    registry.add("svd", svd_transfer)


__all__ = ["svd_transfer", "project", "distillx_register_weight_transfers"]
