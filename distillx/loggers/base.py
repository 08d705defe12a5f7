"""What a metrics logger is: an object the run hands every step and epoch record to.

    class Logger:
        def log_step(self, phase, step, values): ...    # step: the phase's optimizer steps so far (1, 2, ...)
        def log_epoch(self, phase, epoch, values): ...  # epoch: 0-based; values include val_* metrics
        def flush(self): ...                            # optional: the end of a phase
        def close(self): ...                            # optional: Distiller.close()

``values`` maps metric names (``loss``, ``task``, each method's key, ``lr``, ``weight/<term>``,
``val_accuracy``...) to floats, or None for a metric that has no value (a validation set without
labels). Loggers are duck-typed; :class:`Logger` is a convenient base with no-op methods.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

REQUIRED = ("log_step", "log_epoch")


class Logger:
    """Base class of metrics loggers (subclasses override what they need)."""

    name = "logger"

    def log_step(self, phase: str, step: int, values: Mapping[str, Optional[float]]) -> None:
        """One optimizer step of ``phase``; ``step`` counts the phase's steps from 1 over all epochs."""

    def log_epoch(self, phase: str, epoch: int, values: Mapping[str, Optional[float]]) -> None:
        """The per-sample means of ``epoch`` (0-based) of ``phase``, and its validation metrics."""

    def flush(self) -> None:
        """Write out anything buffered (called at the end of every phase)."""

    def close(self) -> None:
        """Release files and connections (called by ``Distiller.close()``)."""


def check_logger(obj: Any, what: str) -> Any:
    """``obj`` if it has callable ``log_step`` and ``log_epoch``, else a TypeError naming ``what``."""
    missing = [m for m in REQUIRED if not callable(getattr(obj, m, None))]
    if missing:
        raise TypeError(f"{what} must be a logger with methods log_step(phase, step, values) and "
                        f"log_epoch(phase, epoch, values) (see distillx.loggers.Logger); {type(obj).__name__} has no "
                        f"{' or '.join(missing)}")
    return obj


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of ``values`` as floats (None, strings and bools are not curves)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
