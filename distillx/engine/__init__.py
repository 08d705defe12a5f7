"""The training engine behind :class:`distillx.Distiller` and :func:`distillx.training.train`.

``loop`` (the epoch loop every phase runs), ``schedules`` (LR and loss-weight schedules),
``checkpoint`` (atomic checkpoints, random state for exact resume), ``distributed`` (torchrun/DDP),
``plan`` (which features each method needs).
"""
from __future__ import annotations

from .checkpoint import CheckpointError
from .loop import TrainingInterrupted
from .schedules import LinearRamp, linear

__all__ = ["CheckpointError", "TrainingInterrupted", "LinearRamp", "linear"]
