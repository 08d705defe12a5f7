"""Weight transfer: initialise a student from a teacher's parameters.

``distillx.transfer`` is both this package and a function: calling it runs a strategy registered by
name (:func:`distillx.plugin.transfer`; ``import distillx`` makes the package callable)::

    import distillx as dx
    report = dx.transfer("select", teacher, student)          # writes into student, returns a TransferReport
    print(report)                                             # one row per student tensor, with the reason
    ensemble = dx.transfer("distribution", teacher, student, n=4, seed=0)   # 4 new (student, report)

Built-in strategies (each ``(teacher, student, **options) -> TransferReport``, writing into
``student``):

================  =========================================================================
``direct``        copy tensors whose names correspond, above all the output layer; truncate
                  (or select) wider ones (:func:`~distillx.transfer.direct.direct`)
``distribution``  sample the student's output layer (or chosen tensors) from the normal fitted
                  to the teacher's fan-in-normalised weights; ``n=`` makes an ensemble
``select``        Weight Selection (Xu et al., ICLR 2024): first-N/uniform layers, consistent
                  uniform element selection (:func:`~distillx.transfer.selection.select`)
``layer_map``     student layer i from teacher layer map[i], DistilBERT's every other layer by
                  default (:func:`~distillx.transfer.layer_map.layer_map`)
``head_fit``      ridge regression of the student's output layer onto the teacher's logits on
                  calibration data (:func:`~distillx.transfer.head_fit.head_fit`)
``prune``         the teacher's most important heads, neurons and channels on calibration data
                  (Minitron; :func:`~distillx.transfer.prune.prune`), depth as ``layer_map``
================  =========================================================================

The plugin manager registers :data:`BUILTIN_TRANSFERS` as the built-in plugin ``distillx.transfer``
(:mod:`distillx.plugin.builtins`): the strategies reach the registry through the same
``distillx_register_weight_transfers`` hook as third-party ones. Writing a strategy: build a :class:`TransferReport` with
``TransferReport.for_model(name, student)``, record every student tensor once, and reuse
:func:`correspond` (which teacher tensor goes with which student tensor), :func:`shrink`,
:func:`uniform_indices` and :func:`layout_of` (fused q/k/v blocks, kept vocabulary rows) as the
built-ins do; the ``svd`` strategy of ``plugins/distillx-svd`` is an example.
"""
from __future__ import annotations

from .adapt import Layout, ShapeMismatch, layout_of, shrink, uniform_indices
from .api import EnsembleMember, Transfer, run_strategy
from .correspond import Match, correspond, layer_stacks
from .direct import direct
from .distribution import distribution
from .errors import TransferError, check_models
from .head_fit import head_fit
from .layer_map import layer_map
from .prune import prune
from .report import ACTIONS, TensorRecord, TransferReport
from .selection import select
from .tensors import output_layer, transferable_tensors

BUILTIN_TRANSFERS: dict = {  # name -> strategy (teacher, student, **options) -> TransferReport
    "direct": direct,
    "distribution": distribution,
    "select": select,
    "layer_map": layer_map,
    "head_fit": head_fit,
    "prune": prune,
}

__all__ = [
    "run_strategy", "Transfer", "EnsembleMember", "TransferReport", "TensorRecord", "TransferError", "ACTIONS",
    "BUILTIN_TRANSFERS", "direct", "distribution", "select", "layer_map", "head_fit", "prune",
    "correspond", "Match", "layer_stacks", "output_layer", "transferable_tensors",
    "shrink", "uniform_indices", "layout_of", "Layout", "ShapeMismatch", "check_models",
]
