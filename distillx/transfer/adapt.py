r"""Shrinking a teacher tensor to a student shape: uniform selection and truncation.

Both pick, along every dimension where the teacher is wider, a set of teacher indices:

- **uniform selection** (Weight Selection, Z. Xu, Y. Chen, K. Vishniakov, Y. Yin, Z. Shen,
  T. Darrell, L. Liu, Z. Liu, "Initializing Models with Larger Ones", ICLR 2024):
  :math:`i_k = \operatorname{round}\big(k\,(D_t-1)/(D_s-1)\big)`, :math:`k = 0..D_s-1`, i.e.
  ``round(linspace(0, D_t - 1, D_s))``, evenly spread over the teacher's width and always keeping
  the first and last element. The indices depend only on :math:`(D_t, D_s)`, so every tensor
  that shares a width (all the tensors reading and writing a residual stream, a conv's output
  channels and the next BatchNorm) selects the same coordinates: the paper's *consistent
  selection*, without which a selected student would mix unrelated channels between layers.
- **truncation**: the leading slice :math:`i_k = k`.

Some dimensions are not one homogeneous axis:

- *fused blocks*: ``nn.MultiheadAttention.in_proj_weight`` is q, k and v stacked, (3E, E); the
  selection is made inside each block and the blocks concatenated, otherwise q rows would be
  taken from k. Likewise LSTM (4 gates) and GRU (3 gates) weights, and any dimension the caller
  declares with ``blocks=``.
- *kept* dimensions must be equal: an embedding's rows are token ids and an output layer's rows
  are classes; choosing a subset would silently renumber them.

A caller that knows *which* teacher elements to keep (pruning by importance,
:mod:`distillx.transfer.channels`) gives them per dimension in :attr:`Layout.indices`; they replace
the rule (and the blocks) on that dimension, so one tensor can mix given and uniform dimensions.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .tensors import owner

RULES = ("select", "truncate")
_HOW = {"select": "select-uniform", "truncate": "truncate"}
INDEXED = "indexed"  # the ``how`` of a tensor whose every shrunk dimension took given indices


class ShapeMismatch(Exception):
    """The teacher tensor cannot be shrunk to the student shape; the message says why (a report reason)."""


def uniform_indices(d_teacher: int, d_student: int) -> list[int]:
    """``round(linspace(0, d_teacher - 1, d_student))``, computed exactly (ties to even, like ``round``).

    Exact integer arithmetic, because float ``linspace`` can land on 1.4999999 where the exact
    value is 1.5 and round the other way, which would break consistency between code paths.
    """
    if d_teacher < 1 or d_student < 1:
        raise ValueError(f"dimensions must be >= 1, got teacher {d_teacher}, student {d_student}")
    if d_student == 1:
        return [0]
    num, den = d_teacher - 1, d_student - 1
    out = []
    for k in range(d_student):
        q, r = divmod(k * num, den)
        if 2 * r > den or (2 * r == den and q % 2 == 1):
            q += 1
        out.append(q)
    return out


def block_indices(d_teacher: int, d_student: int, rule: str, blocks: int = 1) -> list[int]:
    """Teacher indices for one dimension under ``rule``, chosen inside each of ``blocks`` equal blocks."""
    if d_teacher % blocks or d_student % blocks:
        raise ShapeMismatch(f"{blocks} fused blocks do not divide the widths (teacher {d_teacher}, "
                            f"student {d_student})")
    bt, bs = d_teacher // blocks, d_student // blocks
    inner = uniform_indices(bt, bs) if rule == "select" else list(range(bs))
    return [b * bt + i for b in range(blocks) for i in inner]


@dataclass
class Layout:
    """How a tensor's dimensions may be shrunk: ``blocks`` (dim -> number of fused blocks),
    ``keep`` (dim -> why it must not change) and ``indices`` (dim -> the teacher indices to keep,
    one per student element, in the order the student holds them).

    ``indices`` are used wherever that dimension's widths differ, instead of the rule and of
    ``blocks`` (the caller chose the elements, fused blocks included); ``keep`` still wins. Where
    the widths are equal the dimension is copied whole, whatever ``indices`` says.
    """

    blocks: dict[int, int] = field(default_factory=dict)
    keep: dict[int, str] = field(default_factory=dict)
    indices: dict[int, Sequence[int]] = field(default_factory=dict)


_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1, nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}


def layout_of(model: nn.Module, name: str, *, output_layer: Optional[str] = None,
              blocks: Optional[Mapping[str, int]] = None) -> Layout:
    """The :class:`Layout` of ``model``'s tensor ``name``.

    ``output_layer``: path of the model's output layer, whose rows (classes) are kept.
    ``blocks``: ``{glob pattern of tensor names: number of fused blocks along dim 0}`` for fused
    projections the module type does not reveal (a hand-written ``qkv = nn.Linear(E, 3 * E)``:
    ``{"*.qkv.*": 3}``), or ``{pattern: {dim: blocks}}`` for other dims (attention heads:
    :func:`distillx.hf.layouts.attention_blocks`); it takes precedence over what is inferred.
    """
    module, local = owner(model, name)
    layout = Layout()
    if isinstance(module, nn.MultiheadAttention) and local in ("in_proj_weight", "in_proj_bias"):
        layout.blocks[0] = 3
    gates = next((g for cls, g in _GATES.items() if isinstance(module, cls)), None)
    if gates and gates > 1 and local.startswith(("weight_ih", "weight_hh", "bias_ih", "bias_hh")):
        layout.blocks[0] = gates
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and local == "weight":
        layout.keep[0] = "vocabulary: row i is token i"
    if output_layer is not None and name.rpartition(".")[0] == output_layer:
        layout.keep[0] = "output layer: row i is output (class) i"
    for pattern, n in (blocks or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            layout.blocks.update({int(d): int(k) for d, k in n.items()} if isinstance(n, Mapping) else {0: int(n)})
    return layout


def given_indices(indices: Sequence[int], dim: int, d_teacher: int, d_student: int) -> list[int]:
    """``indices`` checked as a selection of ``d_student`` distinct teacher elements out of ``d_teacher``.

    Malformed indices are the caller's bug, not a property of the models: ``ValueError``, not
    :class:`ShapeMismatch` (which a strategy turns into a skipped tensor).
    """
    out = [int(i) for i in indices]
    if len(out) != d_student:
        raise ValueError(f"{len(out)} indices given for dim {dim}, but the student has {d_student} elements there")
    bad = [i for i in out if not 0 <= i < d_teacher]
    if bad:
        raise ValueError(f"indices {bad[:4]} for dim {dim} are outside the teacher's 0..{d_teacher - 1}")
    if len(set(out)) != len(out):
        raise ValueError(f"the indices given for dim {dim} repeat an element: {out}")
    return out


def shrink(teacher: torch.Tensor, shape: tuple[int, ...], rule: Optional[str], layout: Optional[Layout] = None
           ) -> tuple[torch.Tensor, str]:
    """``teacher`` reduced to ``shape`` by ``rule`` (``"select"`` or ``"truncate"``), and the ``how``
    string for the report. Raises :class:`ShapeMismatch` with the reason when it cannot be done.

    A dimension listed in ``layout.indices`` takes those teacher indices instead of the rule.
    ``rule=None`` allows only that: a differing dimension without given indices is a mismatch.
    ``how`` is ``"indexed"`` when every shrunk dimension took given indices, else the rule's name
    with a note of the dimensions that did.
    """
    if rule is not None and rule not in RULES:
        raise ValueError(f"rule must be one of {RULES} or None, got {rule!r}")
    layout = layout or Layout()
    shape = tuple(int(d) for d in shape)
    if teacher.dim() != len(shape):
        raise ShapeMismatch(f"teacher tensor has {teacher.dim()} dimensions, student {len(shape)}")
    out, notes, ruled = teacher, [], False
    for dim, (dt, ds) in enumerate(zip(teacher.shape, shape)):
        if dt == ds:
            continue
        if dim in layout.keep:
            raise ShapeMismatch(f"dim {dim} differs (teacher {dt}, student {ds}) but must match ({layout.keep[dim]})")
        if ds > dt:
            raise ShapeMismatch(f"student is wider than the teacher in dim {dim} ({ds} > {dt}); "
                                f"{_HOW.get(rule, INDEXED)} only shrinks")
        if dim in layout.indices:
            idx = given_indices(layout.indices[dim], dim, dt, ds)
            notes.append(f"given indices in dim {dim}")
        elif rule is None:
            raise ShapeMismatch(f"dim {dim} differs (teacher {dt}, student {ds}) and no indices were given for it")
        else:
            n = layout.blocks.get(dim, 1)
            idx = block_indices(dt, ds, rule, n)
            ruled = True
            if n > 1:
                notes.append(f"per block, {n} blocks in dim {dim}")
        out = out.index_select(dim, torch.tensor(idx, dtype=torch.long, device=teacher.device))
    if not ruled and (rule is None or notes):
        return out, INDEXED
    how = _HOW[rule] + (f" ({'; '.join(notes)})" if notes else "")
    return out, how
