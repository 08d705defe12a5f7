"""Learning-rate schedules (per optimizer step) and loss-weight schedules (per epoch fraction).

Learning rate: ``scheduler=`` of the Distiller takes ``"cosine"`` (default: linear warm-up, then
cosine decay to 0, as in most transformer recipes), ``"linear"`` (warm-up, then linear decay to
0), ``"constant"`` (warm-up, then flat), ``None`` (no scheduler, the optimizer's lr throughout), or
a factory ``(optimizer, total_steps) -> torch.optim.lr_scheduler.LRScheduler``. ``warmup`` is a
number of steps (int) or a fraction of all steps (float in [0, 1)).

Loss weights (TextBrewer-style weight schedulers): ``weight_schedules={"kd": dx.engine.linear(0.0,
1.0, epochs=5)}`` replaces a method's (or ``"task"``'s) weight by the schedule's value at the
current fractional epoch ``e + step / steps_per_epoch``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch

from .. import _checks

SchedulerSpec = Union[None, str, Callable]
SCHEDULES = ("cosine", "linear", "constant")


def warmup_steps(warmup: Union[int, float], total_steps: int) -> int:
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup < 0:
        raise ValueError(f"warmup must be a number of steps (int >= 0) or a fraction of all steps in [0, 1), "
                         f"got {warmup!r}")
    if isinstance(warmup, float):
        if warmup >= 1:
            raise ValueError(f"warmup as a fraction must be < 1, got {warmup!r}")
        return int(round(warmup * total_steps))
    return int(warmup)


def lr_factor(kind: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(spec: SchedulerSpec, optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup: Union[int, float] = 0.0):
    """The per-step LR scheduler for ``spec`` (see the module docstring), or None."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in SCHEDULES:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULES)}, None or a factory "
                             f"(optimizer, total_steps) -> LRScheduler; got {spec!r}")
        w = warmup_steps(warmup, total_steps)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(spec, step, total_steps, w))
    if callable(spec):
        sched = spec(optimizer, total_steps)
        if not hasattr(sched, "step") or not hasattr(sched, "state_dict"):
            raise TypeError(f"scheduler factory must return an LR scheduler (with step() and state_dict()), "
                            f"got {type(sched).__name__}")
        return sched
    raise TypeError(f"scheduler must be a name, None or a factory (optimizer, total_steps) -> LRScheduler, "
                    f"got {type(spec).__name__}")


@dataclass(frozen=True)
class LinearRamp:
    """Weight going linearly from ``start`` to ``end`` over the first ``epochs`` epochs, then ``end``.

    ``value(e)`` at fractional epoch ``e``: ``start + (end − start) · min(e / epochs, 1)``.
    """

    start: float
    end: float
    epochs: float

    def __post_init__(self):
        for name in ("start", "end"):
            _checks.number(f"LinearRamp.{name}", getattr(self, name), ge=0)
        _checks.number("LinearRamp.epochs", self.epochs, gt=0)

    def __call__(self, epoch: float) -> float:
        return self.start + (self.end - self.start) * min(epoch / self.epochs, 1.0)


def linear(start: float, end: float, epochs: float) -> LinearRamp:
    """A linear weight ramp (``dx.engine.linear(0.0, 1.0, epochs=5)``); see :class:`LinearRamp`."""
    return LinearRamp(float(start), float(end), epochs)


def check_weight_schedules(schedules, valid_keys) -> dict:
    if schedules is None:
        return {}
    if not isinstance(schedules, dict):
        raise TypeError(f"weight_schedules must be a dict {{method name or 'task': schedule}}, got "
                        f"{type(schedules).__name__}")
    for key, sched in schedules.items():
        if key not in valid_keys:
            raise ValueError(f"weight_schedules names {key!r}, which is not a loss term; the terms are "
                             f"{', '.join(valid_keys)}")
        if not callable(sched):
            raise TypeError(f"weight_schedules[{key!r}] must be callable epoch -> weight (e.g. "
                            f"distillx.engine.linear(0, 1, epochs=5)), got {type(sched).__name__}")
    return dict(schedules)
