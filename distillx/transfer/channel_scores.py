r"""Which channels of each space matter (activation magnitude) and which a smaller student keeps.

Minitron's width criterion (S. T. Sreenivas et al., "LLM Pruning and Distillation in Practice: The
Minitron Approach", 2024; S. Muralidharan et al., "Compact Language Models via Pruning and
Knowledge Distillation", 2024) ranks a channel by the magnitude of the activations it carries on a
small calibration set, no gradients needed. For a CNN/MLP channel space (:mod:`~distillx.transfer.channels`)
measured at points :math:`p` (its activation outputs, else its normalisation outputs, else its
producers' outputs):

.. math:: a_p(c) = \operatorname{mean}_{\text{samples, positions}} |x_p[\ldots, c, \ldots]|,
   \qquad F(c) = \sum_p \frac{a_p(c)}{\operatorname{mean}_{c'} a_p(c')}

Each point is scaled to mean 1 before the sum, so a residual stream measured after every block of
a stage counts each block alike instead of letting the block with the largest activations decide.
A point whose activations are all zero adds nothing. The student keeps the ``k`` teacher channels
of highest :math:`F` (ties to the lower index), in ascending order, so the kept channels stay in
the teacher's order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
import torch.fx
from torch import nn

from . import calibration as calib
from .channel_graph import ChannelPlan, ChannelSpace, positional, trace
from .errors import TransferError
from .tensors import transferable_tensors


class _Recorder(torch.fx.Interpreter):
    """Runs the traced model and adds up ``|activation|`` per channel at the measurement nodes."""

    def __init__(self, gm: torch.fx.GraphModule, points: Mapping[str, int]):
        super().__init__(gm)
        self.points = points  # node name -> channel dim
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        dim = self.points.get(n.name)
        if dim is not None:  # measured now: an in-place op later (ReLU(inplace=True)) cannot change it
            x = out.detach()
            rows = x.abs().movedim(dim, -1).reshape(-1, x.shape[dim]).to(torch.float64)
            total = rows.sum(0).cpu()
            if not torch.isfinite(total).all():
                raise TransferError(f"the activations at {n.name!r} are not finite (NaN or Inf) on the calibration "
                                    f"data; check the inputs and the model's weights")
            self.sums[n.name] = total + self.sums[n.name] if n.name in self.sums else total
            self.counts[n.name] = self.counts.get(n.name, 0) + rows.shape[0]
        return out


def _check_plan(model: nn.Module, plan: ChannelPlan, gm: torch.fx.GraphModule) -> None:
    tensors = transferable_tensors(model, aliases=True)
    for name, shape in plan.shapes.items():
        here = tuple(tensors[name][0].shape) if name in tensors else None
        if here != tuple(shape):
            raise TransferError(f"the channel plan was made for another model: {name!r} is "
                                f"{'absent' if here is None else here} here but {tuple(shape)} in the plan")
    nodes = {n.name for n in gm.graph.nodes}
    missing = [p[0] for s in plan.spaces for p in s.points if p[0] not in nodes]
    if missing:
        raise TransferError(f"the channel plan was made for another model: its graph has no node {missing[0]!r}")


@torch.no_grad()
def channel_importance(model: nn.Module, plan: ChannelPlan, calibration: Any, device: Any = None,
                       max_batches: Optional[int] = None) -> dict[int, torch.Tensor]:
    """``{space index: (size,) float64 scores}`` for every prunable space of ``plan`` (made by
    :func:`~distillx.transfer.channels.channel_groups` on ``model``), by the rule in the module docstring.

    ``calibration``: an iterable of batches as distillx loaders give them: ``(inputs, targets)``
    pairs, input tensors, or mappings of keyword inputs (``"labels"`` dropped); a single tensor is
    one batch. ``device``: where the inputs go (default: the model's device; the model is not moved).
    ``max_batches``: use at most that many. The model runs traced, in ``eval()`` mode (modes
    restored) under ``no_grad``. No batch at all is a :class:`TransferError`.
    """
    gm = trace(model)
    _check_plan(model, plan, gm)
    points = {name: dim for s in plan.prunable for name, dim, _ in s.points}
    device = torch.device(device) if device is not None else calib.model_device(model)
    recorder = _Recorder(gm, points)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    gm.eval()
    batches = 0
    try:
        for batch in calib.batches(calibration, "prune", max_batches, progress=True):
            recorder.run(*calib.to_device(positional(gm, calib.model_inputs(batch, "prune"), "a calibration batch"),
                                          device))
            batches += 1
    finally:
        for m, training in modes:
            m.train(training)
    if batches == 0:
        raise TransferError("the calibration data yielded no batch (an empty loader?); channel importance needs "
                            "at least one")
    return {s.index: _space_scores(s, recorder) for s in plan.prunable}


def _space_scores(space: ChannelSpace, recorder: _Recorder) -> torch.Tensor:
    score = torch.zeros(space.size, dtype=torch.float64)
    for name, _, _ in space.points:
        mean = recorder.sums[name] / recorder.counts[name]
        scale = mean.mean()
        if scale > 0:  # an all-zero point carries no ranking
            score += mean / scale
    return score


def top_channels(scores: torch.Tensor, k: int) -> list[int]:
    """The ``k`` indices of highest score, ties to the lower index, in ascending order."""
    values = [float(v) for v in scores.tolist()]
    return sorted(sorted(range(len(values)), key=lambda i: (-values[i], i))[:k])


@dataclass(frozen=True)
class ChannelIndices:
    """What :func:`channel_indices` chose.

    ``indices``: ``{(student tensor name, dim): teacher indices}`` (ascending; every index when the
    widths are equal). ``skipped``: ``{student tensor name: reason}`` for tensors whose channels
    could not be chosen (none of their dims is in ``indices``). Tensors in no channel space of
    the student's plan appear in neither.
    """

    indices: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def by_tensor(self) -> dict[str, dict[int, list[int]]]:
        """``{student tensor name: {dim: teacher indices}}``: the ``indices=`` of
        :func:`~distillx.transfer.apply.copy_or_shrink` (:attr:`~distillx.transfer.adapt.Layout.indices`)."""
        out: dict[str, dict[int, list[int]]] = {}
        for (name, dim), idx in self.indices.items():
            out.setdefault(name, {})[dim] = idx
        return out


def _checked(scores: Mapping[int, torch.Tensor], space: ChannelSpace) -> torch.Tensor:
    value = scores.get(space.index)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != (space.size,) or \
            not torch.isfinite(value).all():
        got = "none" if value is None else f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) \
            else type(value).__name__
        raise TransferError(f"scores[{space.index}] (teacher space {space.name}) must be {space.size} finite "
                            f"scores, got {got}")
    return value


def channel_indices(teacher_plan: ChannelPlan, student_plan: ChannelPlan, scores: Mapping[int, torch.Tensor],
                    mapping: Optional[Mapping[str, str]] = None) -> ChannelIndices:
    """The teacher channels each student tensor keeps, space by space.

    A student space corresponds to the teacher space that holds its members' teacher counterparts
    (the same names, or ``mapping[student name]``: ``{m.name: m.teacher_name for m in
    correspond(...) if m.teacher_name}`` for students whose layers read other teacher layers; a
    member missing from ``mapping`` has no counterpart). The teacher space may have more members
    (a shallower student). Equal widths keep every channel; a narrower student keeps the
    :func:`top_channels` of ``scores[teacher space index]`` (:func:`channel_importance`). A student
    space wider than the teacher's, one whose widths differ while either side is fixed, or one whose
    members fall into several teacher spaces is reported in ``skipped``, not raised; scores that do
    not fit their space are a :class:`TransferError`.
    """
    t_space = {member: s for s in teacher_plan.spaces for member in s.members}
    result = ChannelIndices()
    for s in student_plan.spaces:
        counterpart = {(n, d): ((mapping.get(n) if mapping is not None else n), d) for n, d in s.members}
        found = {t_space[c].index: t_space[c] for c in counterpart.values() if c[0] is not None and c in t_space}
        for (n, d), c in counterpart.items():
            if c[0] is not None and c not in t_space:
                result.skipped.setdefault(n, f"dim {d} of the teacher's {c[0]!r} is in no channel space of the "
                                             f"teacher (student space {s.name})")
        if not found:
            continue
        if len(found) > 1:
            names = ", ".join(t.name for t in found.values())
            for n, _ in s.members:
                result.skipped.setdefault(n, f"the student's channel space {s.name} joins tensors the teacher keeps "
                                             f"in different spaces ({names})")
            continue
        t = next(iter(found.values()))
        if s.size == t.size:
            keep = list(range(s.size))
        else:
            reason = None
            if s.size > t.size:
                reason = f"the student's channel space {s.name} is wider than the teacher's ({s.size} > {t.size})"
            elif s.fixed or t.fixed:
                reason = (f"the channels of {s.name} must keep their number ({s.fixed or t.fixed}) but the "
                          f"teacher has {t.size} and the student {s.size}")
            if reason:
                for n, _ in s.members:
                    result.skipped.setdefault(n, reason)
                continue
            keep = top_channels(_checked(scores, t), s.size)
        for (n, d), c in counterpart.items():
            if c[0] is not None and c in t_space:
                result.indices[(n, d)] = keep
    for key in [k for k in result.indices if k[0] in result.skipped]:
        del result.indices[key]  # a tensor is indexed on all its dims or not at all
    return result
