"""The per-batch loss of distillation: forward both models (or read the teacher cache), hand each
method its captured features, weight and sum the terms, and stop on a non-finite one.

    loss = w_task(e) · task_loss(student_logits, targets) + Σ_i w_i(e) · method_i.loss(s_i, t_i, batch)

with ``w(e)`` a term's weight, or its schedule's value at the fractional epoch ``e``; ``s_i``/``t_i``
hold the logits and the features method ``i`` asked for, under its own keys. The teacher runs in
``eval()`` under ``no_grad`` (the caller sets the mode), or not at all when a cache is set.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..methods import Method
from .batches import logits_of
from .plan import FeaturePlan

TASK = "task"  # metrics key of the weighted task loss
STUDENT_INPUT = "student_input"  # teacher capture key of the feature a student consumes


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/inf; the message names the method and, when a captured feature holds
    non-finite values, the model and layer."""


class DistillStep:
    """Callable ``(inputs, targets, indices) -> {"loss": total, "task": ..., <method key>: ...}``.

    ``student`` is what is called for the student's outputs (the student, or its DDP wrapper);
    ``cache`` (a :class:`~distillx.teacher_cache.TeacherCache`) replaces the teacher's forward pass
    when set; ``epoch_fraction`` is read for the weight schedules.

    A student on the teacher's features (``trunk``, a :class:`~distillx.features.Trunk`) is called on
    the teacher's feature at the cut instead of the inputs. The teacher runs whole (capturing that
    feature on the way) only when ``full_teacher`` (a method reads its logits or later features);
    otherwise just its trunk runs, and the layers after the cut never do.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, methods: Sequence[Method], keys: Sequence[str],
                 plan: FeaturePlan, task_loss: Callable, task_weight: float, weight_schedules: dict,
                 check_finite: bool, device: torch.device):
        self.device = device
        self.teacher, self.student, self.methods, self.keys = teacher, student, list(methods), list(keys)
        self.plan, self.task_loss, self.task_weight = plan, task_loss, task_weight
        self.weight_schedules, self.check_finite = weight_schedules, check_finite
        self.cache = None
        self.trunk, self.full_teacher = None, True
        self.epoch_fraction: Callable[[], float] = lambda: 0.0

    def forward(self, inputs, indices=None, live_teacher: bool = False):
        """``(student_logits, student_feats, teacher_logits, teacher_feats)`` of one batch."""
        if self.cache is not None and not live_teacher:
            cached = self.cache.lookup(indices, device=self.device)
            teacher_logits = cached.pop("logits")
            teacher_feats = {k: v for k, v in cached.items() if not k.startswith("topk_")}
        elif self.trunk is not None and not self.full_teacher:
            with torch.no_grad():
                teacher_logits, teacher_feats = None, {STUDENT_INPUT: self.trunk(inputs)}
        else:
            with torch.no_grad():
                teacher_logits = logits_of(self.teacher(inputs), "teacher")
            teacher_feats = self.plan.collect("teacher")
        if self.trunk is not None:
            inputs = teacher_feats.pop(STUDENT_INPUT)
        student_logits = logits_of(self.student(inputs), "student")
        student_feats = self.plan.collect("student")
        return student_logits, student_feats, teacher_logits, teacher_feats

    def weight(self, key: str, base: float) -> float:
        sched = self.weight_schedules.get(key)
        return base if sched is None else float(sched(self.epoch_fraction()))

    def __call__(self, inputs, targets, indices=None) -> dict[str, torch.Tensor]:
        outs = self.forward(inputs, indices)
        student_logits = outs[0]
        batch = (inputs, targets)
        terms: dict[str, torch.Tensor] = {}
        zero = student_logits.new_zeros((), dtype=torch.float32)
        # A zero weight skips the computation: a non-finite loss times 0 would still be NaN.
        w = self.weight(TASK, self.task_weight)
        terms[TASK] = w * self.task_loss(student_logits, targets) if w else zero
        for i, (key, m) in enumerate(zip(self.keys, self.methods)):
            w = self.weight(key, m.weight)
            if w:
                s, t = self.plan.views(i, *outs)
                terms[key] = w * m.loss(s, t, batch)
            else:
                terms[key] = zero
        if self.check_finite:
            self._check_finite(terms, outs)
        return {"loss": sum(terms.values()), **terms}

    def _check_finite(self, terms: dict[str, torch.Tensor], outs) -> None:
        flags = torch.stack([torch.isfinite(t.detach()).all() for t in terms.values()])
        if bool(flags.all()):  # the one synchronisation per step
            return
        key = next(key for key, ok in zip(terms, flags.tolist()) if not ok)
        if key == TASK:
            where = " (the student logits hold NaN/inf)" if not bool(torch.isfinite(outs[0]).all()) else ""
            raise NonFiniteLossError(f"the task loss is {terms[key].item()}{where}; stopped before the optimizer step")
        problem: Optional[str] = self.plan.non_finite(self.keys.index(key), outs)
        raise NonFiniteLossError(f"method {key!r}: its loss is {terms[key].item()}"
                                 + (f"; {problem}" if problem else " although its inputs are finite")
                                 + "; stopped before the optimizer step")
