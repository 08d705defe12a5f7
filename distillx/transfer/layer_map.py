"""The ``layer_map`` weight transfer: student layer i from teacher layer map[i] (DistilBERT)."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from torch import nn

from ..hf.layouts import attention_blocks
from .adapt import uniform_indices
from .apply import copy_or_shrink
from .correspond import MappingSpec, correspond, layer_stacks
from .depth import choose_maps
from .errors import TransferError, check_choice, check_models, close_names
from .report import TransferReport

LayerMap = Union[None, str, Sequence[int], Mapping[str, Sequence[int]]]
RULES = ("uniform", "every", "auto")
DEFAULT_RULE = "uniform"  # measured against "every": see the README's weight-transfer table


def every_map(n_student: int, n_teacher: int) -> list[int]:
    r""":math:`j(i) = \lfloor i\,N_t / N_s \rfloor`: every :math:`(N_t/N_s)`-th teacher layer from layer 0.

    For a teacher twice as deep this is DistilBERT's ``[0, 2, 4, ...]`` (every other layer); it never
    keeps the teacher's last layer.
    """
    return [i * n_teacher // n_student for i in range(n_student)]


def uniform_map(n_student: int, n_teacher: int) -> list[int]:
    r""":math:`j(i) = \operatorname{round}(i\,(N_t-1)/(N_s-1))`: evenly spaced, the first *and the last*
    teacher layer included (``[0, 5]`` for 6 -> 2, ``[0, 2, 5]`` for 6 -> 3)."""
    return uniform_indices(n_teacher, n_student)


def default_map(n_student: int, n_teacher: int) -> list[int]:
    """The data-free default, :data:`DEFAULT_RULE`."""
    return {"uniform": uniform_map, "every": every_map}[DEFAULT_RULE](n_student, n_teacher)


def _check_map(stack: str, layer_map: Sequence[int], n_student: int, n_teacher: int) -> list[int]:
    if isinstance(layer_map, (str, bytes)) or not isinstance(layer_map, Sequence):
        raise TypeError(f"layer_map: the map for {stack or 'the root'} must be a list of teacher layer indices, "
                        f"got {layer_map!r}")
    if len(layer_map) != n_student:
        raise TransferError(f"layer_map: the map for {stack or 'the root'} has {len(layer_map)} entries but the "
                            f"student has {n_student} layers there")
    for i, j in enumerate(layer_map):
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < n_teacher:
            raise TransferError(f"layer_map: map[{i}] = {j!r} for {stack or 'the root'} is not a teacher layer "
                                f"(0..{n_teacher - 1})")
    return list(layer_map)


def layer_map(teacher: nn.Module, student: nn.Module, *, map: LayerMap = None, mapping: MappingSpec = None,
              adapt: Optional[str] = "select", blocks: Optional[Mapping[str, Any]] = None,
              calibration: Any = None, max_batches: Optional[int] = None) -> TransferReport:
    r"""Initialise student layer :math:`i` from teacher layer :math:`\mathrm{map}[i]`.

    DistilBERT (V. Sanh, L. Debut, J. Chaumond, T. Wolf, "DistilBERT, a distilled version of
    BERT", 2019) halves BERT's depth and initialises the student "by taking one layer out of
    two" of the teacher; this generalises it to any map. Layers are the numbered children of a
    stack (a ``nn.ModuleList``/``nn.Sequential`` of one layer type, e.g. ``encoder.layers.3.*``);
    everything outside the stacks (embeddings, final norm, head) is matched by name.

    Options:
        map: for every stack, ``[j_0, j_1, ...]`` (student layer i <- teacher layer j_i), or
            ``{stack path: [...]}`` per stack, or a rule: ``"uniform"`` (:func:`uniform_map`: evenly
            spaced with the first and the last layer, the default), ``"every"`` (:func:`every_map`:
            DistilBERT's every other layer from layer 0, the default before it was measured worse),
            ``"auto"`` (chosen on ``calibration`` data: the map whose pruned teacher stays closest
            to the teacher, :mod:`distillx.transfer.depth`; the report lists each layer's block
            influence and the distances of the maps tried).
        calibration: batches for ``map="auto"`` (as for ``head_fit``); ``max_batches`` bounds them.
        mapping: ``{student name: teacher name}`` of tensors or modules (or a callable), e.g. when
            the stacks have different paths: ``{"layers": "encoder.layer"}``.
        adapt: how tensors of different shapes are shrunk: ``"select"`` (default, uniform
            selection as in :func:`~distillx.transfer.selection.select`), ``"truncate"``, or
            ``None`` to skip them. Equal shapes are copied.
        blocks: ``{glob of student tensor names: fused blocks along dim 0}`` (or ``{glob: {dim: n}}``);
            transformer attention is shrunk per head and per q/k/v (:mod:`distillx.hf.layouts`).

    Example::

        dx.transfer("layer_map", bert_base, distil, map=[0, 2, 4, 6, 8, 10])
        dx.transfer("layer_map", bert_base, distil, map="auto", calibration=loader)
    """
    check_models(teacher, student)
    check_choice("layer_map", "adapt", adapt, ("select", "truncate", None))
    plan = DepthPlan("layer_map", teacher, student, map, calibration, max_batches)
    report = TransferReport.for_model("layer_map", student)
    matches = correspond(teacher, student, mapping=mapping, layers=plan.layers)
    plan.describe(report)
    blocks = {**attention_blocks(teacher, student), **(blocks or {})}  # heads kept apart; given ones win
    return copy_or_shrink(student, matches, report, adapt, blocks)


class DepthPlan:
    """Which teacher layer each student layer of each stack reads (``map`` as :func:`layer_map`
    takes it); :meth:`layers` is the layer rule for :func:`correspond`, :meth:`describe` writes the
    maps (and, for ``"auto"``, the evidence) into a report. Shared by ``layer_map`` and ``prune``."""

    def __init__(self, who: str, teacher: nn.Module, student: nn.Module, map: LayerMap, calibration: Any,
                 max_batches: Optional[int], data_needed: bool = False):
        stacks = layer_stacks(student)
        if not stacks and not data_needed:
            raise TransferError(f"{who}: the student has no stack of layers (an nn.ModuleList or nn.Sequential "
                                "of layers of one type); use 'direct' or 'select' instead")
        rule = map if isinstance(map, str) else None
        if rule is not None:
            check_choice(who, "map" if who == "layer_map" else "layers", rule, RULES)
            map = None
        elif calibration is not None and not data_needed:
            raise TransferError(f"{who}: calibration= is used only with map=\"auto\"")
        self.choices: dict = {}
        if rule == "auto":
            t_stacks = layer_stacks(teacher)
            missing = [p for p in stacks if p not in t_stacks]
            if missing:
                raise TransferError(f"{who}: \"auto\" needs the teacher's stack at the student's path; the teacher "
                                    f"has no stack {missing[0]!r} (stacks: {', '.join(repr(p) for p in t_stacks)})")
            self.choices = choose_maps(teacher, {p: (n, t_stacks[p]) for p, n in stacks.items()}, calibration,
                                       who, max_batches)
            map = {p: c.map for p, c in self.choices.items()}
        elif calibration is None and max_batches is not None:
            raise TransferError(f"{who}: max_batches= bounds the calibration data, and there is none")
        if isinstance(map, Mapping):
            for path in map:
                if path not in stacks:
                    raise TransferError(f"{who}: map names {path!r}, which is not a stack of layers in the student "
                                        f"(stacks: {', '.join(repr(s) for s in stacks)})." + close_names(path, stacks))
        self.map = map
        self.named = {"uniform": uniform_map, "every": every_map}.get(rule, default_map)
        self.used: dict[str, list[int]] = {}

    def layers(self, stack: str, i: int, n_student: int, n_teacher: int) -> Optional[int]:
        if stack not in self.used:
            given = self.map.get(stack) if isinstance(self.map, Mapping) else self.map
            self.used[stack] = (self.named(n_student, n_teacher) if given is None
                                else _check_map(stack, given, n_student, n_teacher))
        return self.used[stack][i]

    def describe(self, report: TransferReport) -> None:
        report.notes += [f"{stack or 'root'}: student layer i <- teacher layer {m}" for stack, m in self.used.items()]
        for c in self.choices.values():
            report.importance.setdefault("layers", {})[c.stack] = c.to_dict()
            report.notes.append(f"{c.stack or 'root'}: map {c.map} chosen on calibration data ({c.search}; output "
                                f"distance {c.distance:.4f}); block influence per teacher layer: "
                                + ", ".join(f"{b:.3f}" for b in c.influence))
