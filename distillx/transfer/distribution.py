"""The ``distribution`` weight transfer: sample student weights from the teacher's fitted distribution."""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .correspond import MappingSpec, Match, correspond
from .errors import TransferError, check_choice, check_models, close_names
from .report import TransferReport
from .tensors import output_layer

PER = ("tensor", "row")
SCALES = ("fan_in", None)


def _selected(student: nn.Module, matches: list[Match], params: Union[None, str, Sequence[str]]) -> set[str]:
    """Names of the student tensors ``params`` asks to sample."""
    names = [m.name for m in matches]
    if params is None:
        head = output_layer(student)
        if head is None:
            raise TransferError("distribution: the student has no nn.Linear output layer to sample; name the "
                                "tensors with params=[...] (or params='all')")
        return {n for n in names if n.startswith(head + ".")}
    if params == "all":
        return set(names)
    if isinstance(params, str) or not isinstance(params, Sequence):
        raise TypeError(f"distribution: params must be None, 'all' or a list of student tensor/module names, "
                        f"got {params!r}")
    chosen = set()
    for p in params:
        hit = {n for n in names if n == p or n.startswith(p + ".")}
        if not hit:
            raise TransferError(f"distribution: params names {p!r}, which is neither a tensor nor a module of the "
                                f"student." + close_names(p, names))
        chosen |= hit
    return chosen


def _fan_in(shape: Sequence[int]) -> int:
    return math.prod(shape[1:]) if len(shape) >= 2 else 1


def fit(teacher: torch.Tensor, per: str, scale: Optional[str], rows: Optional[int] = None
        ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(mean, std, description)`` of the normalised teacher tensor, float64.

    Per tensor: scalars. Per row: shape ``(rows, 1, ..., 1)`` (one mean/std per output row), when
    the tensor has 2+ dims and ``rows`` equals its first dimension; otherwise per tensor.
    """
    t = teacher.detach().to(torch.float64)
    if scale == "fan_in" and t.dim() >= 2:
        t = t * math.sqrt(_fan_in(t.shape))
    if per == "row" and t.dim() >= 2 and rows == t.shape[0]:
        flat = t.reshape(t.shape[0], -1)
        std, mean = torch.std_mean(flat, dim=1, correction=0)
        view = (-1,) + (1,) * (t.dim() - 1)
        desc = (f"normal per row ({t.shape[0]} rows; mean {mean.mean():.4g}, std {std.mean():.4g} on average)")
        return mean.reshape(view), std.reshape(view), desc
    std, mean = torch.std_mean(t, correction=0)
    desc = f"normal(mean={mean.item():.4g}, std={std.item():.4g})"
    if per == "row" and t.dim() >= 2:
        desc += f" per tensor (rows differ: teacher {t.shape[0]}, student {rows})"
    return mean, std, desc


@torch.no_grad()
def distribution(teacher: nn.Module, student: nn.Module, *, params: Union[None, str, Sequence[str]] = None,
                 per: str = "tensor", seed: Optional[int] = None, scale: Optional[str] = "fan_in",
                 mapping: MappingSpec = None) -> TransferReport:
    r"""Fit a normal distribution to (normalised) teacher weights and draw the student's from it.

    For each chosen student tensor :math:`W_s` and its teacher counterpart :math:`W_t` (by default
    the output layers, weight and bias):

    1. *normalise*: :math:`\tilde W_t = W_t \sqrt{f_t}` with :math:`f` the fan-in (product of all
       but the first dimension; 1 for 1-D tensors, whose values are in output units). This is the
       scale of LeCun/He initialisation (K. He, X. Zhang, S. Ren, J. Sun, "Delving Deep into
       Rectifiers", ICCV 2015: :math:`\operatorname{Var} w \propto 1/f`), under which a layer's
       output variance does not depend on its width, so statistics of a wide teacher mean the same
       for a narrow student;
    2. *fit*: :math:`\mu, \sigma` = mean and standard deviation (maximum likelihood) of
       :math:`\tilde W_t`, over the whole tensor (``per="tensor"``) or per output row
       (``per="row"``: row :math:`r` of the student is drawn with row :math:`r`'s statistics,
       which keeps per-class offsets of an output layer; needs equal row counts, else the tensor
       statistics are used and the report says so);
    3. *sample*: :math:`W_s = (\mu + \sigma\,\varepsilon)/\sqrt{f_s}`,
       :math:`\varepsilon \sim \mathcal N(0, 1)` of the student's own shape, from a
       ``torch.Generator`` seeded with ``seed`` and consumed in student tensor order.

    Sampling instead of copying gives a student that starts with the teacher's weight statistics
    but not its exact weights, so several students sampled from one teacher with different seeds
    form an ensemble (``dx.transfer("distribution", teacher, student, n=4, seed=0)``).

    Options:
        params: ``None`` (the output layer), ``"all"`` (every tensor with a teacher counterpart),
            or a list of student tensor or module names.
        per: ``"tensor"`` or ``"row"``.
        seed: an int; ``None`` draws a fresh seed, recorded in the report so the draw can be repeated.
        scale: ``"fan_in"`` (default) or ``None`` (fit and draw the raw values).
        mapping: ``{student name: teacher name}`` of tensors or modules, or a callable.

    Buffers (running statistics) are never sampled; tensors not chosen keep their values.
    """
    check_models(teacher, student)
    check_choice("distribution", "per", per, PER)
    check_choice("distribution", "scale", scale, SCALES)
    if seed is None:
        seed = random.SystemRandom().getrandbits(63)
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"distribution: seed must be an int or None, got {seed!r}")
    generator = torch.Generator().manual_seed(seed)

    report = TransferReport.for_model("distribution", student)
    report.notes.append(f"seed={seed}")
    matches = correspond(teacher, student, mapping=mapping, layers="first")
    chosen = _selected(student, matches, params)
    for m in matches:
        shape = tuple(m.tensor.shape)
        if m.name not in chosen:
            report.skipped(m.name, shape, "not sampled: not among params (default: the output layer)")
        elif m.kind == "buffer":
            report.skipped(m.name, shape, "buffer: running statistics are not sampled")
        elif m.teacher_tensor is None:
            report.skipped(m.name, shape, m.reason)
        elif m.teacher_tensor.dim() != len(shape):
            report.skipped(m.name, shape, f"{m.teacher_name} has {m.teacher_tensor.dim()} dimensions, "
                                          f"the student {len(shape)}")
        else:
            mean, std, desc = fit(m.teacher_tensor, per, scale, rows=shape[0] if shape else None)
            draw = mean + std * torch.randn(shape, generator=generator, dtype=torch.float64)
            if scale == "fan_in" and len(shape) >= 2:
                draw = draw / math.sqrt(_fan_in(shape))
                desc += ", fan-in normalised"
            m.tensor.copy_(draw)
            report.sampled(m.name, shape, m.teacher_name, tuple(m.teacher_tensor.shape), desc, seed, m.reason)
    return report
