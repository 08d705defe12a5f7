"""The Distiller: train a student on the task loss plus weighted distillation losses from a fixed teacher.

    import distillx as dx
    d = dx.Distiller(teacher, student, methods=[dx.method("kd", T=4.0, weight=0.9)])
    history = d.fit(train_loader, epochs=20, val_loader=val_loader)

Per batch ``(inputs, targets)``:

    loss = task_weight * task_loss(student_logits, targets) + Σ_i method_i.weight * method_i.loss(s, t, batch)

with ``s = {"logits": student(inputs)}`` and ``t = {"logits": teacher(inputs)}``, the teacher in
``eval()`` mode under ``torch.no_grad()``. This is the minimal loop; feature hooks, weight transfer,
checkpoints, AMP and DDP come later (DESIGN §6).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Optional, Union

import math

import torch
import torch.nn.functional as F
from torch import nn

from .methods import Method
from .plugin import get_plugin_manager
from .training import (OptimizerSpec, build_optimizer, check_epochs, check_loader, evaluate, logits_of,
                       resolve_device, run_epochs)

TASK = "task"  # metrics key of the weighted task loss


class Distiller:
    """Distil ``teacher`` into ``student`` with ``methods`` (built by :func:`distillx.method`).

    Args:
        teacher: the trained teacher. It is only read: kept in ``eval()``, run under ``no_grad``,
            never handed to the optimizer. It is moved to ``device``.
        student: the model to train; moved to ``device``.
        methods: distillation methods, e.g. ``[distillx.method("kd", T=4.0, weight=0.9)]``. Each
            contributes ``method.weight * method.loss(...)``; its own parameters (e.g. adapters)
            are trained with the student. Feature-level methods need hooks, which come in a later
            release: they raise ``NotImplementedError`` for now.
        task_loss: ``(student_logits, targets) -> Tensor``; default cross-entropy.
        task_weight: weight of the task loss (0 disables it: pure distillation).
        optimizer: ``None`` (AdamW, lr 1e-3), a factory ``params -> Optimizer``, or an optimizer
            that already holds the student's and the methods' parameters.
        device: where to train; default the student's device.

    Metrics (per epoch, from :meth:`fit`): ``epoch`` (0-based), ``loss`` (the total),
    ``task`` and one entry per method name with its *weighted* loss (so they sum to ``loss``),
    and ``val_accuracy``/``val_loss`` of the student when a ``val_loader`` is given.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, methods: Optional[Sequence[Method]] = (),
                 task_loss: Optional[Callable] = None, task_weight: float = 1.0,
                 optimizer: OptimizerSpec = None, device: Union[None, str, torch.device] = None):
        for name, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
        if teacher is student:
            raise ValueError("teacher and student are the same module; the student needs its own parameters")
        shared = {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}
        if shared:
            raise ValueError(f"teacher and student share {len(shared)} parameter tensor(s); training the "
                             "student would change the teacher. Give the student its own copy.")
        self.methods = _check_methods(methods)
        self.task_weight = _check_weight(task_weight, "task_weight")
        if self.task_weight == 0 and not any(m.weight != 0 for m in self.methods):
            raise ValueError("task_weight is 0 and no method has a non-zero weight: there is nothing to train")
        if task_loss is not None and not callable(task_loss):
            raise TypeError(f"task_loss must be callable (logits, targets) -> Tensor, got {type(task_loss).__name__}")
        self.task_loss = F.cross_entropy if task_loss is None else task_loss
        self.device = resolve_device(student, device)
        self.teacher = teacher.to(self.device)
        self.student = student.to(self.device)
        for m in self.methods:
            if isinstance(m, nn.Module):  # methods with learned parts (adapters) train on the same device
                m.to(self.device)
        self._keys = _metric_keys(self.methods)
        self.optimizer = build_optimizer(optimizer, self._trainable_parameters())
        self.history: list[dict[str, float]] = []

    # -- public API ------------------------------------------------------------------------------
    def fit(self, train_loader: Iterable, epochs: int, val_loader: Optional[Iterable] = None) -> list[dict[str, float]]:
        """Train the student for ``epochs`` passes over ``train_loader``; return per-epoch metrics.

        Batches are ``(inputs, targets)`` pairs. Fires the plugin events ``distillx_on_fit_start``,
        ``distillx_on_epoch_end`` and ``distillx_on_fit_end``. The teacher's and student's
        train/eval modes are restored afterwards. The history is also appended to ``self.history``.
        """
        # Validate before any plugin hears "fit started".
        check_epochs(epochs)
        check_loader(train_loader, "train_loader")
        if val_loader is not None:
            check_loader(val_loader, "val_loader")
        hook = get_plugin_manager().hook
        teacher_mode, student_mode = self.teacher.training, self.student.training
        # eval(): dropout off and BatchNorm statistics frozen, so the teacher's targets are
        # deterministic and its buffers never change.
        self.teacher.eval()
        try:
            hook.distillx_on_fit_start(distiller=self)
            history = run_epochs(
                self.student, train_loader, epochs, self._losses, self.optimizer, self.device,
                val_loader=val_loader, val_loss_fn=self.task_loss,
                on_epoch_end=lambda epoch, metrics: hook.distillx_on_epoch_end(
                    distiller=self, epoch=epoch, metrics=metrics))
        finally:
            self.teacher.train(teacher_mode)
            self.student.train(student_mode)
        self.history.extend(history)
        hook.distillx_on_fit_end(distiller=self, metrics=dict(history[-1]))
        return history

    def evaluate(self, loader: Iterable, model: Optional[nn.Module] = None) -> dict[str, float]:
        """Accuracy and task loss of ``model`` (default the student) on ``loader``."""
        return evaluate(self.student if model is None else model, loader, self.task_loss, self.device)

    # -- internals -------------------------------------------------------------------------------
    def _trainable_parameters(self) -> list[nn.Parameter]:
        """Student parameters, then each method's extra parameters, without duplicates."""
        params, seen = [], set()
        for p in [*self.student.parameters(), *(q for m in self.methods for q in m.parameters())]:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def _losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted loss terms of one batch; ``loss`` is their sum."""
        # no_grad rather than inference_mode: inference tensors cannot be saved for backward, and
        # some method losses (e.g. F.mse_loss) save their teacher-side input.
        with torch.no_grad():
            teacher_out = {"logits": logits_of(self.teacher(inputs), "teacher")}
        student_out = {"logits": logits_of(self.student(inputs), "student")}
        batch = (inputs, targets)
        terms: dict[str, torch.Tensor] = {}
        zero = student_out["logits"].new_zeros(())
        # A zero weight skips the computation: a non-finite loss times 0 would still be NaN.
        terms[TASK] = self.task_weight * self.task_loss(student_out["logits"], targets) if self.task_weight else zero
        for key, m in zip(self._keys, self.methods):
            terms[key] = m.weight * m.loss(student_out, teacher_out, batch) if m.weight else zero
        return {"loss": sum(terms.values()), **terms}


def _check_weight(weight, name: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {weight!r}")
    return float(weight)


def _check_methods(methods) -> list[Method]:
    if methods is None:
        return []
    if isinstance(methods, Method):
        raise TypeError("methods must be a list of methods; wrap the single method in a list: methods=[...]")
    if isinstance(methods, (str, bytes)) or not isinstance(methods, Iterable):
        raise TypeError(f"methods must be a list of distillx methods, got {type(methods).__name__}")
    methods = list(methods)
    for i, m in enumerate(methods):
        if not isinstance(m, Method):
            raise TypeError(f"methods[{i}] must be a distillx Method (build it with distillx.method(name, ...)), "
                            f"got {type(m).__name__}")
        _check_weight(m.weight, f"methods[{i}].weight ({_name(m)})")
        if list(m.features()):
            raise NotImplementedError(f"method {_name(m)!r} needs intermediate features, which this Distiller "
                                      "does not capture yet; only logit methods (e.g. 'kd') are supported")
    return methods


def _name(method: Method) -> str:
    return getattr(method, "name", None) or type(method).__name__


def _metric_keys(methods: Sequence[Method]) -> list[str]:
    """One metrics key per method: its name, suffixed ``#2``, ``#3``… when a name repeats."""
    keys, counts = [], {}
    for m in methods:
        base = _name(m)
        counts[base] = counts.get(base, 0) + 1
        keys.append(base if counts[base] == 1 else f"{base}#{counts[base]}")
    if TASK in keys or "loss" in keys:
        raise ValueError(f"a method may not be named {TASK!r} or 'loss' (reserved metrics keys)")
    return keys
