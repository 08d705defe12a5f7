"""The ``direct`` weight transfer: copy what corresponds, truncate what is wider."""
from __future__ import annotations

from typing import Mapping, Optional

from torch import nn

from .apply import copy_or_shrink
from .correspond import MappingSpec, correspond
from .errors import check_choice, check_models
from .report import TransferReport

ADAPT = ("truncate", "select", None)


def direct(teacher: nn.Module, student: nn.Module, *, mapping: MappingSpec = None,
           adapt: Optional[str] = "truncate", blocks: Optional[Mapping[str, int]] = None) -> TransferReport:
    r"""Copy teacher tensors into the student where names and shapes correspond.

    Correspondence (:mod:`distillx.transfer.correspond`): the ``mapping`` first, then the output
    layer (the student's last ``nn.Linear`` takes the teacher's, whatever their names: it carries
    the teacher's decision rule, the most valuable single thing to transfer), then equal names,
    where layer ``i`` of a stack reads the teacher's layer ``i`` (a shallower student gets the
    teacher's first layers, the initialisation of PKD, S. Sun, Y. Cheng, Z. Gan, J. Liu, "Patient
    Knowledge Distillation for BERT Model Compression", EMNLP 2019).

    Equal shapes are copied. Where the teacher is wider, ``adapt`` decides:

    - ``"truncate"`` (default): the leading slice :math:`W_s = W_t[:d_0, :d_1, \dots]`;
    - ``"select"``: uniform selection :math:`W_s = W_t[I(D_0, d_0), I(D_1, d_1), \dots]` with
      :math:`I(D, d) = \operatorname{round}(\operatorname{linspace}(0, D-1, d))` (the ``select``
      strategy's rule, applied here to same-named tensors only);
    - ``None``: shapes that differ are skipped.

    Either way fused q/k/v (and LSTM/GRU gate) blocks are shrunk block by block, and the rows of
    embeddings and of the output layer must match. Tensors with no counterpart are skipped.

    Options:
        mapping: ``{student name: teacher name}`` of tensors or modules (or a callable
            ``student tensor name -> teacher tensor name | None``) overriding the name rule.
        adapt: ``"truncate"``, ``"select"`` or ``None``.
        blocks: ``{glob of student tensor names: fused blocks along dim 0}``, e.g. ``{"*.qkv.*": 3}``.

    Example::

        report = dx.transfer("direct", teacher, student, mapping={"classifier": "head"})
    """
    check_models(teacher, student)
    check_choice("direct", "adapt", adapt, ADAPT)
    report = TransferReport.for_model("direct", student)
    matches = correspond(teacher, student, mapping=mapping, layers="first")
    return copy_or_shrink(student, matches, report, adapt, blocks)
