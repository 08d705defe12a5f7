"""Run a weight transfer strategy safely: on a copy of the student, checked, copied back only on
success (:func:`run_strategy`), or later (:class:`Transfer`). ``distillx.transfer(name, ...)`` looks the
strategy up by name (:func:`distillx.plugin.transfer`) and calls these."""
from __future__ import annotations

import copy
import difflib
import inspect
import random
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from torch import nn

from .. import _checks
from .errors import TransferError, check_models
from .report import TransferReport
from .tensors import transferable_tensors


class EnsembleMember(NamedTuple):
    """One student of an ensemble made with ``n=``: the new student and its report."""

    student: nn.Module
    report: TransferReport


def check_options(name: str, strategy: Callable, options: dict[str, Any], n: Optional[int]) -> None:
    """Unknown options are a TypeError naming them and the valid ones (checked before any work)."""
    try:
        params = list(inspect.signature(strategy).parameters.values())[2:]
    except (TypeError, ValueError):  # a builtin or C callable: let the call itself complain
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        valid = None
    else:
        valid = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for option in options:
            if option not in valid:
                close = difflib.get_close_matches(option, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"weight transfer {name!r} has no option {option!r}{hint}; its options: "
                                f"{', '.join(valid) or 'none'}")
    if n is not None:
        _checks.integer("n", n, ge=1)  # the number of sampled students
        if valid is not None and "seed" not in valid:
            raise TypeError(f"n={n} makes an ensemble of sampled students, but weight transfer {name!r} takes no "
                            f"seed (it is deterministic: every copy would be the same)")


def _copy(student: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(student)
    except Exception as exc:
        raise TransferError(f"cannot deep-copy the student ({type(exc).__name__}: {exc}); distillx.transfer works "
                            f"on a copy so that a failure leaves the student untouched") from exc


def _run(name: str, strategy: Callable, teacher: nn.Module, student: nn.Module, options: dict[str, Any],
         allow_empty: bool) -> TransferReport:
    """Apply ``strategy`` to ``student`` (a copy) and check what it returned."""
    # every name, tied ones included: the report has one record per name (report.aliases)
    before = {n: (tuple(t.shape), t.dtype) for n, (t, _) in transferable_tensors(student, aliases=True).items()}
    report = strategy(teacher, student, **options)
    if not isinstance(report, TransferReport):
        raise TransferError(f"weight transfer {name!r} returned {type(report).__name__}, not a TransferReport")
    after = {n: (tuple(t.shape), t.dtype) for n, (t, _) in transferable_tensors(student, aliases=True).items()}
    if after != before:
        changed = sorted(set(before) ^ set(after) | {n for n in before if after.get(n, before[n]) != before[n]})
        raise TransferError(f"weight transfer {name!r} changed the student's structure (tensors added, removed or "
                            f"reshaped: {', '.join(changed)}); a strategy must only write values")
    report.expected = tuple(before)  # the API, not the strategy, decides what complete means
    report.check_complete()
    if report.transferred == 0 and not allow_empty:
        reasons = list(dict.fromkeys(r.reason for r in report))[:4]
        raise TransferError(
            f"weight transfer {name!r} transferred nothing: no student tensor has a usable teacher counterpart, "
            f"so the teacher and the student look unrelated. Reasons: {'; '.join(reasons)}. Pass a mapping=, "
            f"choose another strategy, or allow_empty=True to accept an empty transfer.")
    return report


@torch.no_grad()
def _load(student: nn.Module, source: nn.Module) -> None:
    """Copy every transferable tensor of ``source`` (the finished copy) into ``student``, in place
    (parameters keep their identity, so an optimizer built on them stays valid). Each tensor is written
    once, under its first name: tied tensors stay tied (the deep copy kept the ties)."""
    values = transferable_tensors(source)
    for name, (tensor, _) in transferable_tensors(student).items():
        tensor.copy_(values[name][0])


def run_strategy(name: str, strategy: Callable[..., TransferReport], teacher: nn.Module, student: nn.Module, *,
                 n: Optional[int] = None, allow_empty: bool = False, **options: Any
                 ) -> Union[TransferReport, list[EnsembleMember]]:
    """Run weight transfer ``strategy`` (registered as ``name``) from ``teacher`` into ``student``.

    - ``n=None`` (default): the strategy runs on a deep copy of ``student``; only when it succeeds
      (and its report names every student tensor exactly once) are the copy's values copied into
      ``student``, in place. Returns the :class:`TransferReport`. On any error ``student`` is
      unchanged.
    - ``n=k`` (strategies with a ``seed`` option, e.g. ``distribution``): returns a list of ``k``
      :class:`EnsembleMember` ``(student, report)``, each a new deep copy of ``student`` drawn with
      seed ``seed + i`` (member 0 equals a single transfer with ``seed``); with ``seed=None`` each
      member gets a fresh random seed, recorded in its report. ``student`` itself is not modified.

    ``allow_empty``: a transfer that moves nothing at all (every tensor skipped) means the models do
    not correspond and raises :class:`TransferError`, unless this is true. Unknown options are a
    ``TypeError`` before anything runs.
    """
    check_options(name, strategy, options, n)
    _checks.boolean("allow_empty", allow_empty)
    check_models(teacher, student)
    if n is None:
        work = _copy(student)
        report = _run(name, strategy, teacher, work, options, allow_empty)
        _load(student, work)
        return report
    seed = options.pop("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    members = []
    for i in range(n):
        member_seed = seed + i if seed is not None else random.SystemRandom().getrandbits(63)
        work = _copy(student)
        members.append(EnsembleMember(work, _run(name, strategy, teacher, work, {**options, "seed": member_seed},
                                                 allow_empty)))
    return members


@dataclass(frozen=True)
class Transfer:
    """A weight transfer chosen and validated now, applied later: ``Transfer(...)(teacher, student)``.

    Made by ``distillx.transfer(name, **options)`` without models, which resolves ``name`` to its
    ``strategy``; calling it is :func:`run_strategy` with the stored options.
    """

    name: str
    strategy: Callable[..., TransferReport]
    options: dict[str, Any] = field(default_factory=dict)
    n: Optional[int] = None
    allow_empty: bool = False

    def __post_init__(self):
        check_options(self.name, self.strategy, self.options, self.n)
        _checks.boolean("allow_empty", self.allow_empty)

    def __call__(self, teacher: nn.Module, student: nn.Module) -> Union[TransferReport, list[EnsembleMember]]:
        return run_strategy(self.name, self.strategy, teacher, student, n=self.n, allow_empty=self.allow_empty,
                     **self.options)
