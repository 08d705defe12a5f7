"""Metrics loggers: where a run's step and epoch records go besides ``metrics.json``.

``Distiller(..., loggers=["tensorboard"])`` (or ``[logging]`` in a run config) builds them by name
from the plugin registry (``distillx_register_loggers``); only rank 0 logs. Built-in:
``"tensorboard"`` (:class:`TensorBoardLogger`). A plugin adds W&B, MLflow... with a factory
``(run_dir=None, **options) -> logger``.
"""
from __future__ import annotations

from .base import Logger, check_logger, scalars
from .fanout import LoggerWarning, Loggers
from .tensorboard import TensorBoardLogger

#: Built-in logger factories by registered name.
BUILTIN_LOGGERS = {"tensorboard": TensorBoardLogger}

__all__ = ["Logger", "Loggers", "LoggerWarning", "TensorBoardLogger", "BUILTIN_LOGGERS", "check_logger", "scalars"]
