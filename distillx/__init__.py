"""distillx: knowledge distillation for PyTorch.

Importing distillx loads the compiled core (if built) and no third-party plugin; the plugin manager is
created on first use (``distillx.method``, ``distillx.transfer``, ``distillx.plugin.get_registries``).
The code's map is ``docs/architecture.md``.
"""
from __future__ import annotations

import types

from ._version import __version__
from . import functional
from .functional import kd_loss, linear_kd_loss
from . import transfer
from .transfer import TransferError, TransferReport
from . import plugin
from .plugin import method
from . import engine
from .compose import compose, compose_report, load_composed, save_composed
from .distiller import Distiller


class _CallableTransferPackage(types.ModuleType):
    """``distillx.transfer(name, teacher, student, **options)`` runs a strategy by name
    (:func:`distillx.plugin.transfer`) while ``distillx.transfer`` stays the package of strategies,
    reports and helpers (``distillx.transfer.TransferReport``)."""

    def __call__(self, name, teacher=None, student=None, **options):
        return plugin.transfer(name, teacher, student, **options)


# The package sits below the plugin layer, so the name lookup is attached here, at the top.
transfer.__class__ = _CallableTransferPackage

__all__ = ["functional", "kd_loss", "linear_kd_loss", "method", "Distiller", "transfer", "TransferReport",
           "TransferError", "plugin", "engine", "compose", "compose_report", "save_composed", "load_composed",
           "__version__"]
