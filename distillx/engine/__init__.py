"""The training engine behind :class:`distillx.Distiller` and :func:`distillx.engine.train`.

``loop`` (the epoch loop every phase runs), ``step`` (the per-batch distillation loss),
``training`` (plain supervised training, evaluation, optimizers), ``batches`` (what a loader yields),
``schedules`` (LR and loss-weight schedules), ``checkpoint`` (atomic, verified, safe checkpoints,
build/restore), ``rng`` (the random state exact resume saves, and the loaders it refuses),
``distributed`` (torchrun/DDP), ``plan`` (which features each method
needs), ``arguments`` (the Distiller's argument checks).
"""
from __future__ import annotations

from .checkpoint import CheckpointError
from .loop import TrainingInterrupted
from .schedules import LinearRamp, linear
from .step import NonFiniteLossError
from .training import evaluate, train

__all__ = ["CheckpointError", "TrainingInterrupted", "NonFiniteLossError", "LinearRamp", "linear", "train",
           "evaluate"]
