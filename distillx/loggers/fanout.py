"""Several loggers behind one object, each isolated from the others and from training.

A logger that raises while logging (a network hiccup of a W&B or MLflow plugin, a full disk) is
reported once with a :class:`LoggerWarning` naming it and the error, then dropped for the rest of
the run: the curves are a by-product, training and its own records (``metrics.json``, checkpoints)
go on. Building a logger (unknown name, bad option, missing package) is an error at construction.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Sequence


class LoggerWarning(RuntimeWarning):
    """A logger failed and was dropped; training went on."""


class Loggers:
    """``log_step``/``log_epoch``/``flush``/``close`` fanned out to ``loggers`` (``names``: how
    warnings call them). Empty when this process does not log (ranks other than 0)."""

    def __init__(self, loggers: Sequence[Any] = (), names: Sequence[str] = ()):
        names = list(names) or [getattr(lg, "name", None) or type(lg).__name__ for lg in loggers]
        self._active = list(zip(names, loggers))
        self.failed: list[tuple[str, str]] = []  # (name, error) of every dropped logger

    def __bool__(self) -> bool:
        return bool(self._active)

    def __len__(self) -> int:
        return len(self._active)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._active]

    def _call(self, method: str, *args) -> None:
        for name, logger in list(self._active):
            fn = getattr(logger, method, None)
            if fn is None:  # flush/close are optional
                continue
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - any logger failure is reported, then isolated
                self._active.remove((name, logger))
                self.failed.append((name, f"{type(exc).__name__}: {exc}"))
                warnings.warn(f"logger {name!r} failed in {method}() and was dropped for the rest of the run "
                              f"(training goes on; metrics.json still has every record): {type(exc).__name__}: {exc}",
                              LoggerWarning, stacklevel=3)

    def log_step(self, phase: str, step: int, values: Mapping[str, Any]) -> None:
        self._call("log_step", phase, step, dict(values))

    def log_epoch(self, phase: str, epoch: int, values: Mapping[str, Any]) -> None:
        self._call("log_epoch", phase, epoch, dict(values))

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")
