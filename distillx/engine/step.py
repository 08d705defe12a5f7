"""The per-batch loss of distillation: forward both models (or read the teacher cache), hand each
method its captured features, weight and sum the terms, and stop on a non-finite one.

    loss = w_task(e) · task_loss(student_logits, targets) + Σ_i w_i(e) · method_i.loss(s_i, t_i, batch)

with ``w(e)`` a term's weight, or its schedule's value at the fractional epoch ``e``; ``s_i``/``t_i``
hold the logits and the features method ``i`` asked for, under its own keys. The teacher runs in
``eval()`` under ``no_grad`` (the caller sets the mode), or not at all when a cache is set.

Models are called with the batch's inputs as :func:`~distillx.engine.batches.call_model` says
(``model(x)``, ``model(*x)``, ``model(**x)``). The task term needs targets (a mapping batch without
labels has none: no task term) and the student's logits. When no active term reads one side's
logits, the output layers methods apply themselves (``lm_kd``) are skipped on that side.
"""
from __future__ import annotations

from collections.abc import Mapping
import contextlib
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..features.paths import unwrap_model
from ..methods import Method
from ..methods.base import BatchContext, checked_loss
from .batches import call_model, logits_of
from .plan import FeaturePlan

TASK = "task"  # metrics key of the weighted task loss
STUDENT_INPUT = "student_input"  # teacher capture key of the feature a student consumes


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/inf; the message names the method and, when a captured feature holds
    non-finite values, the model and layer."""


def _not_a_tensor(trunk, feature) -> str:
    """Why a cut whose output is a tuple, list or mapping cannot feed the student, and the selector
    (the ``"PATH:INDEX"`` / ``"PATH:KEY"`` form of feature paths) that picks one of its tensors."""
    def describe(v):
        return f"a Tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"

    if isinstance(feature, (tuple, list)):
        what = f"a {type(feature).__name__} of {len(feature)} elements ({', '.join(map(describe, feature))})"
        first = next((i for i, v in enumerate(feature) if isinstance(v, torch.Tensor)), 0)
    elif isinstance(feature, Mapping):
        what = f"a {type(feature).__name__} with keys {', '.join(map(repr, feature))}"
        first = next((k for k, v in feature.items() if isinstance(v, torch.Tensor)), next(iter(feature), 0))
    else:
        what, first = describe(feature), 0
    verb = "receives" if trunk.spec.capture == "input" else "outputs"
    # The step calls the student model(*feature) on a tuple, the composed model head(feature): they
    # would disagree, so one tensor is required (or a student that takes its inputs whole).
    return (f"student_input={trunk.at!r}: the teacher's layer {trunk.path!r} {verb} {what}, but the student takes one "
            f"tensor: use student_input={trunk.at + ':' + str(first)!r} to select element {first!r} (or give the "
            "student distillx_whole_inputs = True to take it whole)")


class DistillStep:
    """Callable ``(inputs, targets, indices) -> {"loss": total, "task": ..., <method key>: ...}``.

    ``student`` is the plain student (FSDP-sharded in place under ``strategy="fsdp"``); ``ddp``, when
    set, is the DistributedDataParallel wrapper of a :class:`~distillx.engine.distributed.Trainable`
    whose forward is :meth:`terms`; ``cache`` (a :class:`~distillx.teacher_cache.TeacherCache`) replaces
    the teacher's forward pass when set; ``epoch_fraction`` is read for the weight schedules.

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
        self.balancer = None
        self.term_weights: dict[str, float] = {}  # each term's weight in the last step (loss balancing reads them)
        self.ddp = None
        self._outs = None
        self.trunk, self.full_teacher = None, True
        self.epoch_fraction: Callable[[], float] = lambda: 0.0
        # The generator methods that rewrite batches draw from (one per process, in checkpoints);
        # None when no method does.
        self.generator: Optional[torch.Generator] = None

    def needs_logits(self, targets=None) -> tuple[bool, bool]:
        """Whether this step's active terms read the (student, teacher) logits."""
        methods = any(m.uses_logits and self.weight(k, m.weight) for k, m in zip(self.keys, self.methods))
        task = targets is not None and bool(self.weight(TASK, self.task_weight))
        return task or methods, methods

    def teacher_logits_used(self) -> bool:
        """Whether any method reading logits may ever be active (what a teacher cache must hold)."""
        return any(m.uses_logits and (m.weight or k in self.weight_schedules) for k, m in zip(self.keys, self.methods))

    def cache_forward(self, inputs) -> Optional[torch.Tensor]:
        """The teacher's logits of one batch for a teacher cache (None when no method reads them: its
        output layers are skipped then, as in training); the plan's hooks capture its features."""
        need = self.teacher_logits_used()
        with self.plan.skipping("teacher", not need):
            out = call_model(self.teacher, inputs, "teacher")
        return logits_of(out, "teacher", required=False) if need else None

    def teacher_outputs(self, inputs, indices, need: bool, live: bool = False):
        """``(teacher_logits, teacher_feats)``: from the cache, or the teacher under ``no_grad``."""
        if self.cache is not None and not live:
            cached = self.cache.lookup(indices, device=self.device)
            logits = cached.pop("logits", None) if need else None
            return logits, {k: v for k, v in cached.items() if not k.startswith("topk_") and k != "logits"}
        if self.trunk is not None and not self.full_teacher:
            with torch.no_grad():
                return None, {STUDENT_INPUT: call_model(self.trunk, inputs, "teacher")}
        with torch.no_grad(), self.plan.skipping("teacher", not need):
            out = call_model(self.teacher, inputs, "teacher")
        return (logits_of(out, "teacher", required=False) if need else None), self.plan.collect("teacher")

    def student_input(self, inputs, teacher_feats):
        """What the student is called on: the batch's inputs, or the teacher's feature at the cut, which
        must be a tensor unless the student takes its inputs whole (``distillx_whole_inputs = True``)."""
        if self.trunk is None:
            return inputs
        feature = teacher_feats.pop(STUDENT_INPUT)
        if not isinstance(feature, torch.Tensor) and not getattr(unwrap_model(self.student), "distillx_whole_inputs",
                                                                 False):
            raise ValueError(_not_a_tensor(self.trunk, feature))
        return feature

    def student_outputs(self, inputs, need: bool):
        """``(student_logits, student_feats)`` of the (unwrapped) student."""
        with self.plan.skipping("student", not need):
            out = call_model(self.student, inputs, "student")
        return (logits_of(out, "student", required=False) if need else None), self.plan.collect("student")

    def forward(self, inputs, indices=None, live_teacher: bool = False, targets=None):
        """``(student_logits, student_feats, teacher_logits, teacher_feats)`` of one batch (logits
        None where no active term reads them or the model has none)."""
        need_s, need_t = self.needs_logits(targets)
        teacher_logits, teacher_feats = self.teacher_outputs(inputs, indices, need_t, live_teacher)
        student_in = self.student_input(inputs, teacher_feats)
        return (*self.student_outputs(student_in, need_s), teacher_logits, teacher_feats)

    def weight(self, key: str, base: float) -> float:
        sched = self.weight_schedules.get(key)
        return base if sched is None else float(sched(self.epoch_fraction()))

    def rewrite(self, inputs, targets):
        """The batch after every active method's :meth:`~distillx.methods.Method.prepare_batch`
        (in the methods' order), with the feature hooks paused while they run."""
        for key, m in zip(self.keys, self.methods):
            if m.rewrites_batch and self.weight(key, m.weight):
                context = BatchContext(unwrap_model(self.student), self.teacher, self.generator, self.device)
                with self.plan.paused():
                    inputs, targets = m.prepare_batch(inputs, targets, context)
        return inputs, targets

    def method_metrics(self, terms: dict) -> dict[str, torch.Tensor]:
        """``<key>/<name>`` of every method's :attr:`~distillx.methods.Method.metric_names` this
        step (0 where the method was inactive)."""
        out = {}
        for key, m in zip(self.keys, self.methods):
            if not m.metric_names:
                continue
            values = m.batch_metrics() if self.term_weights.get(key) else {}
            for name in m.metric_names:
                value = values.get(name, 0.0)
                out[f"{key}/{name}"] = torch.as_tensor(value, dtype=torch.float64, device=self.device).detach()
        return out

    def epoch_metrics(self, metrics: dict) -> dict:
        """The methods' :meth:`~distillx.methods.Method.epoch_metrics` from an epoch's means."""
        out = {}
        for key, m in zip(self.keys, self.methods):
            prefix = f"{key}/"
            means = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
            if m.metric_names and means:
                out.update({prefix + k: float(v) for k, v in m.epoch_metrics(means).items()})
        return out

    def __call__(self, inputs, targets, indices=None) -> dict[str, torch.Tensor]:
        if self.generator is not None:
            inputs, targets = self.rewrite(inputs, targets)
        need_s, need_t = self.needs_logits(targets)
        teacher_logits, teacher_feats = self.teacher_outputs(inputs, indices, need_t)
        student_in = self.student_input(inputs, teacher_feats)
        # Under DDP the student's forward *and* the losses run inside the wrapper, so DDP sees which
        # parameters the losses reach (hooked features, adapters) and which they do not (a pooler).
        # A step that measures the balance factors averages its per-term gradients itself: no_sync.
        sync = (self.ddp.no_sync() if self.ddp is not None and self.balancer is not None and self.balancer.due()
                else contextlib.nullcontext())
        with sync:
            terms = (self.ddp if self.ddp is not None else self.terms)(inputs, targets, need_s, teacher_logits,
                                                                       teacher_feats, student_in)
        if self.check_finite:
            self._check_finite(terms, self._outs)
        stats = self.method_metrics(terms)
        if self.balancer is None:
            return {"loss": sum(terms.values()), **terms, **stats}
        return {"loss": self.balancer.total(terms), **terms, **self.balancer.logged(self.device), **stats}

    def terms(self, inputs, targets, need_logits: bool, teacher_logits, teacher_feats,
              student_in=None) -> dict[str, torch.Tensor]:
        """The student's forward pass (on ``student_in``, by default the inputs) and every weighted loss
        term of one batch (methods get the batch ``(inputs, targets)``, its attention mask included)."""
        student_in = inputs if student_in is None else student_in
        outs = self._outs = (*self.student_outputs(student_in, need_logits), teacher_logits, teacher_feats)
        student_logits = outs[0]
        batch = (inputs, targets)
        terms: dict[str, torch.Tensor] = {}
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        # A zero weight skips the computation: a non-finite loss times 0 would still be NaN.
        w = self.term_weights[TASK] = self.weight(TASK, self.task_weight)
        if w and targets is not None:
            if student_logits is None:
                raise ValueError("the task loss needs the student's logits, but the student returned none (a model "
                                 "without an output layer?); set task_weight=0 to distil it on features only")
            terms[TASK] = w * self.task_loss(student_logits, targets)
        else:
            terms[TASK] = zero
        # A method's loss needs a graph only where there is something to train through it.
        need_graph = torch.is_grad_enabled() and any(p.requires_grad for p in self.student.parameters())
        for i, (key, m) in enumerate(zip(self.keys, self.methods)):
            w = self.term_weights[key] = self.weight(key, m.weight)
            if w:
                s, t = self.plan.views(i, *outs)
                terms[key] = w * checked_loss(m, key, m.loss(s, t, batch), need_graph)
            else:
                terms[key] = zero
        return terms

    def _check_finite(self, terms: dict[str, torch.Tensor], outs) -> None:
        flags = torch.stack([torch.isfinite(t.detach()).all() for t in terms.values()])
        if bool(flags.all()):  # the one synchronisation per step
            return
        key = next(key for key, ok in zip(terms, flags.tolist()) if not ok)
        if key == TASK:
            where = (" (the student logits hold NaN/inf)" if outs[0] is not None and not bool(torch.isfinite(outs[0]).all())
                     else "")
            raise NonFiniteLossError(f"the task loss is {terms[key].item()}{where}; stopped before the optimizer step")
        problem: Optional[str] = self.plan.non_finite(self.keys.index(key), outs)
        raise NonFiniteLossError(f"method {key!r}: its loss is {terms[key].item()}"
                                 + (f"; {problem}" if problem else " although its inputs are finite")
                                 + "; stopped before the optimizer step")
