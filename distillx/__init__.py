"""distillx: knowledge distillation for PyTorch.

Importing distillx loads the compiled core (if built) and no third-party plugin; the plugin manager is
created on first use (``distillx.method``, ``distillx.plugin.get_registries``).
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import functional  # noqa: E402
from .functional import kd_loss, linear_kd_loss  # noqa: E402
from .plugin import method  # noqa: E402
from .distiller import Distiller  # noqa: E402
from . import engine  # noqa: E402
from . import transfer  # noqa: E402  (a callable package: dx.transfer(name, teacher, student, **options))
from .transfer import TransferError, TransferReport  # noqa: E402

__all__ = ["functional", "kd_loss", "linear_kd_loss", "method", "Distiller", "transfer", "TransferReport",
           "TransferError", "__version__"]
