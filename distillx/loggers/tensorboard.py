"""The built-in ``"tensorboard"`` logger: every step and epoch metric as TensorBoard scalars, written
with ``torch.utils.tensorboard.SummaryWriter`` (the ``tensorboard`` extra:
``pip install 'distillx[tensorboard]'``).

Tags: ``<phase>/<metric>`` per optimizer step (x axis: the phase's step count over all epochs) and
``<phase>/epoch/<metric>`` per epoch (x axis: the 0-based epoch), e.g. ``student/kd``,
``student/lr``, ``teacher/loss``, ``student/epoch/val_accuracy``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

from .. import _checks
from .base import Logger, scalars

SUBDIR = "tensorboard"  # the default log directory under the run's checkpoint_dir


def summary_writer_class():
    """``SummaryWriter``, or an ImportError naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch raises ImportError when the tensorboard package is missing
        raise ImportError("logger 'tensorboard' needs the tensorboard package: pip install 'distillx[tensorboard]' "
                          f"(or pip install tensorboard) ({exc})") from None
    return SummaryWriter


class TensorBoardLogger(Logger):
    """Scalars into ``log_dir`` (default ``<run_dir>/tensorboard``, ``run_dir`` being the
    Distiller's ``checkpoint_dir``). The writer (and its event file) is created at the first record,
    so building a Distiller writes nothing; ``flush_secs`` is SummaryWriter's."""

    name = "tensorboard"

    def __init__(self, run_dir: Optional[str] = None, log_dir: Optional[str] = None, flush_secs: int = 120):
        if log_dir is None:
            if run_dir is None:
                raise ValueError("logger 'tensorboard' writes under checkpoint_dir/tensorboard by default, but "
                                 "checkpoint_dir is None: set checkpoint_dir, or give the directory with "
                                 "{'name': 'tensorboard', 'log_dir': 'runs/tb'}")
            log_dir = os.path.join(os.fspath(run_dir), SUBDIR)
        if not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir):
            raise TypeError(f"logger 'tensorboard': log_dir must be a non-empty path, got {log_dir!r}")
        self.log_dir = os.fspath(log_dir)
        self.flush_secs = _checks.integer("flush_secs", flush_secs, ge=1)
        self._writer_class = summary_writer_class()  # a missing package fails now, not at the first step
        self._writer: Any = None

    @property
    def writer(self):
        if self._writer is None:
            self._writer = self._writer_class(log_dir=self.log_dir, flush_secs=self.flush_secs)
        return self._writer

    def log_step(self, phase: str, step: int, values: Mapping[str, Any]) -> None:
        for key, value in scalars(values).items():
            self.writer.add_scalar(f"{phase}/{key}", value, global_step=step)

    def log_epoch(self, phase: str, epoch: int, values: Mapping[str, Any]) -> None:
        for key, value in scalars(values).items():
            self.writer.add_scalar(f"{phase}/epoch/{key}", value, global_step=epoch)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None  # a later record opens a new event file in the same directory
