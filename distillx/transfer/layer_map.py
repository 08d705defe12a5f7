"""The ``layer_map`` weight transfer: student layer i from teacher layer map[i] (DistilBERT)."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from torch import nn

from ..hf.layouts import attention_blocks
from .apply import copy_or_shrink
from .correspond import MappingSpec, correspond, layer_stacks
from .errors import TransferError, check_choice, check_models, close_names
from .report import TransferReport

LayerMap = Union[None, Sequence[int], Mapping[str, Sequence[int]]]


def default_map(n_student: int, n_teacher: int) -> list[int]:
    r""":math:`j(i) = \lfloor i\,N_t / N_s \rfloor`: every :math:`(N_t/N_s)`-th teacher layer from layer 0.

    For a teacher twice as deep this is DistilBERT's ``[0, 2, 4, ...]`` (every other layer).
    """
    return [i * n_teacher // n_student for i in range(n_student)]


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
              adapt: Optional[str] = "select", blocks: Optional[Mapping[str, Any]] = None) -> TransferReport:
    r"""Initialise student layer :math:`i` from teacher layer :math:`\mathrm{map}[i]`.

    DistilBERT (V. Sanh, L. Debut, J. Chaumond, T. Wolf, "DistilBERT, a distilled version of
    BERT", 2019) halves BERT's depth and initialises the student "by taking one layer out of
    two" of the teacher; this generalises it to any map. Layers are the numbered children of a
    stack (a ``nn.ModuleList``/``nn.Sequential`` of one layer type, e.g. ``encoder.layers.3.*``);
    everything outside the stacks (embeddings, final norm, head) is matched by name.

    Options:
        map: for every stack, ``[j_0, j_1, ...]`` (student layer i <- teacher layer j_i), or
            ``{stack path: [...]}`` per stack; default :func:`default_map`
            (:math:`\lfloor i N_t/N_s \rfloor`, DistilBERT's every other layer for a teacher twice as deep).
        mapping: ``{student name: teacher name}`` of tensors or modules (or a callable), e.g. when
            the stacks have different paths: ``{"layers": "encoder.layer"}``.
        adapt: how tensors of different shapes are shrunk: ``"select"`` (default, uniform
            selection as in :func:`~distillx.transfer.selection.select`), ``"truncate"``, or
            ``None`` to skip them. Equal shapes are copied.
        blocks: ``{glob of student tensor names: fused blocks along dim 0}`` (or ``{glob: {dim: n}}``);
            transformer attention is shrunk per head and per q/k/v (:mod:`distillx.hf.layouts`).

    Example::

        dx.transfer("layer_map", bert_base, distil, map=[0, 2, 4, 6, 8, 10])
    """
    check_models(teacher, student)
    check_choice("layer_map", "adapt", adapt, ("select", "truncate", None))
    stacks = layer_stacks(student)
    if not stacks:
        raise TransferError("layer_map: the student has no stack of layers (an nn.ModuleList or nn.Sequential "
                            "of layers of one type); use 'direct' or 'select' instead")
    if isinstance(map, Mapping):
        for path in map:
            if path not in stacks:
                raise TransferError(f"layer_map: map names {path!r}, which is not a stack of layers in the student "
                                    f"(stacks: {', '.join(repr(s) for s in stacks)})." + close_names(path, stacks))

    used: dict[str, list[int]] = {}

    def rule(stack: str, i: int, n_student: int, n_teacher: int) -> Optional[int]:
        if stack not in used:
            given = map.get(stack) if isinstance(map, Mapping) else map
            used[stack] = (default_map(n_student, n_teacher) if given is None
                           else _check_map(stack, given, n_student, n_teacher))
        return used[stack][i]

    report = TransferReport.for_model("layer_map", student)
    matches = correspond(teacher, student, mapping=mapping, layers=rule)
    report.notes += [f"{stack or 'root'}: student layer i <- teacher layer {m}" for stack, m in used.items()]
    blocks = {**attention_blocks(teacher, student), **(blocks or {})}  # heads kept apart; given ones win
    return copy_or_shrink(student, matches, report, adapt, blocks)
