"""The training engine behind :class:`distillx.Distiller` and :func:`distillx.engine.train`.

``loop`` (the epoch loop every phase runs), ``step`` (the per-batch distillation loss),
``training`` (plain supervised training, evaluation, optimizers), ``batches`` (what a loader yields:
pairs or mappings, and calling a model with them), ``schedules`` (LR and loss-weight schedules),
``checkpoint`` (atomic, verified, safe checkpoints, build/restore), ``rng`` (the random state exact
resume saves, and the loaders it refuses), ``signals`` (SIGINT/SIGTERM: a flag between steps, a stop
at once on a later signal), ``distributed`` (torchrun/DDP/FSDP, the ranks' agreement, collective
timeouts), ``sharding`` (every
loader form split across ranks), ``fsdp`` (FSDP2 and distributed checkpoints), ``plan`` (which features each method
needs), ``arguments`` (the Distiller's argument checks).
"""
from __future__ import annotations

from .batches import call_model, causal_lm_loss
from .checkpoint import CheckpointError
from .loop import TrainingInterrupted
from .schedules import LinearRamp, linear
from .step import NonFiniteLossError
from .training import evaluate, train

__all__ = ["CheckpointError", "TrainingInterrupted", "NonFiniteLossError", "LinearRamp", "linear", "train",
           "evaluate", "call_model", "causal_lm_loss"]
