"""Write matched teacher tensors into the student: copy equal shapes, shrink the others."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .adapt import ShapeMismatch, layout_of, shrink
from .correspond import Match
from .report import TransferReport
from .tensors import output_layer


def settle_trivial(m: Match, report: TransferReport) -> bool:
    """Skip a tensor without a teacher counterpart, copy one of the same shape; True when done, so a
    strategy only has to decide what to do with the shapes that differ."""
    shape = tuple(m.tensor.shape)
    if m.teacher_tensor is None:
        report.skipped(m.name, shape, m.reason)
        return True
    if tuple(m.teacher_tensor.shape) == shape:
        with torch.no_grad():
            m.tensor.copy_(m.teacher_tensor)
        report.copied(m.name, shape, m.teacher_name, m.reason)
        return True
    return False


@torch.no_grad()
def copy_or_shrink(student: nn.Module, matches: list[Match], report: TransferReport, rule: Optional[str],
                   blocks: Optional[Mapping[str, int]] = None,
                   indices: Optional[Mapping[str, Mapping[int, Sequence[int]]]] = None) -> TransferReport:
    """For each match: equal shapes are copied; other shapes are shrunk with ``rule``
    (``"select"``/``"truncate"``, see :mod:`~distillx.transfer.adapt`) or, with ``rule=None``,
    skipped; a tensor without a counterpart is skipped with the match's reason.

    ``indices``: ``{student tensor name: {dim: teacher indices}}``, explicit selections
    (:attr:`Layout.indices`, e.g. :meth:`distillx.transfer.channels.ChannelIndices.by_tensor`) that
    replace ``rule`` on those dimensions; with ``rule=None`` a tensor with indices is still shrunk,
    and a dimension without them makes it skipped.

    The output layer's rows (classes) and an embedding's rows (tokens) are never shrunk.
    """
    head = output_layer(student)
    indices = indices or {}
    for m in matches:
        if settle_trivial(m, report):
            continue
        shape, t_shape = tuple(m.tensor.shape), tuple(m.teacher_tensor.shape)
        if rule is None and m.name not in indices:
            report.skipped(m.name, shape, f"{m.teacher_name} has shape {t_shape}, not {shape}, and adapt=None")
            continue
        layout = layout_of(student, m.name, output_layer=head, blocks=blocks)
        layout.indices.update(indices.get(m.name, {}))
        try:
            value, how = shrink(m.teacher_tensor, shape, rule, layout)
        except ShapeMismatch as exc:
            report.skipped(m.name, shape, f"{m.teacher_name} {t_shape} does not fit: {exc}")
            continue
        m.tensor.copy_(value)
        report.adapted(m.name, shape, m.teacher_name, t_shape, how, m.reason)
    return report
