"""The Distiller: train a student on the task loss plus weighted distillation losses from a fixed teacher.

    import distillx as dx
    d = dx.Distiller(teacher, student, methods=[dx.method("kd", T=4.0, weight=0.9),
                                                dx.method("at", student="layer2", teacher="layer3", weight=1000.0)])
    history = d.fit(train_loader, epochs=20, val_loader=val_loader)

Per batch ``(inputs, targets)``:

    loss = task_weight * task_loss(student_logits, targets) + Σ_i method_i.weight * method_i.loss(s_i, t_i, batch)

with ``s_i = {"logits": student(inputs), **features}`` and ``t_i = {"logits": teacher(inputs), **features}``
holding the logits and the intermediate features method ``i`` asked for (:meth:`Method.features`),
under the method's own keys. The teacher runs in ``eval()`` mode under ``torch.no_grad()``.

Features: the Distiller collects every method's :class:`~distillx.methods.FeatureRequest`, namespaces
the keys per method (so two methods may use the same key; identical requests are captured once) and
builds one :class:`~distillx.features.FeatureExtractor` per model: the student's keeps the graph,
the teacher's detaches. Both are attached at construction (so before any ``torch.compile``'d call
of the models, which would not see hooks added later), removed at the end of :meth:`Distiller.fit`
(re-attached by the next ``fit``) and by :meth:`Distiller.close`.

Adapters: methods whose trainable parts depend on feature shapes (``sld``'s adapters) report
``needs_setup``. The optimizer must hold their parameters, so it is built only after they exist:
``Distiller(..., example_inputs=x)`` runs one dry forward pass of both models right away (``eval()``
mode, no gradient), lets the methods build their adapters and builds the optimizer; otherwise
:meth:`Distiller.fit` does the same on its first batch (:meth:`Distiller.setup` does it on demand,
e.g. to attach a learning-rate scheduler to ``d.optimizer`` before training). Until then
``d.optimizer`` is None.

Checks: an unknown layer path fails at construction naming the method and the layer; a feature
whose shape a method cannot use fails at the first step naming method and layers; a non-finite
loss stops training before the optimizer step with an error naming the method and, when a
captured feature holds NaN/inf, the model and layer (``check_finite=False`` skips this check and
its one device synchronisation per step).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Optional, Union

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .features import FeatureExtractor, FeaturePathError, FeatureSpec, MissingFeatureError, resolve_module
from .features.spec import PENULTIMATE
from .methods import Method
from .plugin import get_plugin_manager
from .training import (OptimizerSpec, build_optimizer, check_epochs, check_loader, evaluate, logits_of,
                       resolve_device, run_epochs, unpack_batch)

TASK = "task"  # metrics key of the weighted task loss
SIDES = ("student", "teacher")


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/inf; the message names the method and, when a captured feature holds
    non-finite values, the model and layer."""


class Distiller:
    """Distil ``teacher`` into ``student`` with ``methods`` (built by :func:`distillx.method`).

    Args:
        teacher: the trained teacher. It is only read: kept in ``eval()``, run under ``no_grad``,
            never handed to the optimizer. It is moved to ``device``.
        student: the model to train; moved to ``device``.
        methods: distillation methods, e.g. ``[distillx.method("kd", T=4.0, weight=0.9)]``. Each
            contributes ``method.weight * method.loss(...)``; its own parameters (e.g. adapters)
            are trained with the student. Feature methods get their features through hooks (see
            the module docstring).
        task_loss: ``(student_logits, targets) -> Tensor``; default cross-entropy.
        task_weight: weight of the task loss (0 disables it: pure distillation).
        optimizer: ``None`` (AdamW, lr 1e-3), a factory ``params -> Optimizer``, or an optimizer
            that already holds the student's and the methods' parameters (not possible while a
            method still builds its adapters lazily: pass a factory or ``example_inputs`` then).
        device: where to train; default the student's device.
        example_inputs: a batch of inputs for the dry forward pass that builds shape-dependent
            adapters now rather than at the start of :meth:`fit` (ignored when no method needs it).
        check_finite: stop with :class:`NonFiniteLossError` when a loss term is NaN/inf (default
            True; costs one device synchronisation per step).
        transfer: initialise the student from the teacher's weights before anything else: a
            strategy name (``"select"``), a :class:`distillx.transfer.Transfer` with options
            (``dx.transfer("head_fit", calibration=loader)``) or a callable
            ``(teacher, student) -> TransferReport``. Applied at construction, to a copy first, so
            a failing transfer leaves the student untouched; the report is ``d.transfer_report``.

    Metrics (per epoch, from :meth:`fit`): ``epoch`` (0-based), ``loss`` (the total),
    ``task`` and one entry per method name with its *weighted* loss (so they sum to ``loss``),
    and ``val_accuracy``/``val_loss`` of the student when a ``val_loader`` is given.

    The Distiller holds hooks on both models from construction until the end of :meth:`fit` or
    :meth:`close`; ``with Distiller(...) as d:`` closes it on exit.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, methods: Optional[Sequence[Method]] = (),
                 task_loss: Optional[Callable] = None, task_weight: float = 1.0,
                 optimizer: OptimizerSpec = None, device: Union[None, str, torch.device] = None,
                 example_inputs: Optional[torch.Tensor] = None, check_finite: bool = True,
                 transfer: Union[None, str, Callable] = None):
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
        self.check_finite = bool(check_finite)
        self.device = resolve_device(student, device)
        self.teacher = teacher.to(self.device)
        self.student = student.to(self.device)
        # Before the hooks go on: a transfer runs the models (head_fit) and deep-copies the student.
        self.transfer_report = _apply_transfer(transfer, self.teacher, self.student)
        self._move_methods()
        self._keys = _metric_keys(self.methods)
        self._plan = _FeaturePlan(self.teacher, self.student, self.methods, self._keys)
        self._plan.attach()
        self._optimizer_spec = optimizer
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.history: list[dict[str, float]] = []
        try:
            if not self._pending_setup():
                self.optimizer = build_optimizer(optimizer, self._trainable_parameters())
            elif example_inputs is not None:
                self.setup(example_inputs)
            elif isinstance(optimizer, torch.optim.Optimizer):
                raise ValueError(
                    f"method(s) {', '.join(repr(_name(m)) for m in self._pending_setup())} build their adapters from "
                    "the first features they see, so an optimizer built beforehand cannot hold them; pass a factory "
                    "such as `lambda params: torch.optim.SGD(params, lr=0.1)`, or example_inputs=<a batch of "
                    "inputs> to build the adapters now")
        except BaseException:
            self.close()
            raise

    # -- public API ------------------------------------------------------------------------------
    def setup(self, inputs: torch.Tensor) -> torch.optim.Optimizer:
        """Build the methods' shape-dependent parts (adapters) from one dry forward pass on ``inputs``,
        then the optimizer over the student's and the methods' parameters; return the optimizer.

        Both models run in ``eval()`` mode under ``no_grad`` (BatchNorm statistics do not move);
        their modes are restored. :meth:`fit` calls this on its first batch when needed.
        """
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a tensor batch of model inputs, got {type(inputs).__name__}")
        pending = self._pending_setup()
        if pending:
            inputs = inputs.to(self.device)
            self._plan.attach()
            modes = [(m, m.training) for m in (self.teacher, self.student)]
            try:
                self.teacher.eval()
                self.student.eval()
                with torch.no_grad():
                    outs = self._forward(inputs)
                    for i, m in enumerate(self.methods):
                        if m in pending:
                            m.setup(*self._plan.views(i, *outs))
            finally:
                for model, mode in modes:
                    model.train(mode)
            self._move_methods()
            still = self._pending_setup()
            if still:
                raise RuntimeError(f"method(s) {', '.join(repr(_name(m)) for m in still)} still need setup after "
                                   "setup() ran (their needs_setup stayed True)")
        if self.optimizer is None:
            self.optimizer = build_optimizer(self._optimizer_spec, self._trainable_parameters())
        return self.optimizer

    def fit(self, train_loader: Iterable, epochs: int, val_loader: Optional[Iterable] = None) -> list[dict[str, float]]:
        """Train the student for ``epochs`` passes over ``train_loader``; return per-epoch metrics.

        Batches are ``(inputs, targets)`` pairs. Fires the plugin events ``distillx_on_fit_start``,
        ``distillx_on_epoch_end`` and ``distillx_on_fit_end``. The teacher's and student's
        train/eval modes are restored afterwards, and the feature hooks removed (the next ``fit``
        puts them back). The history is also appended to ``self.history``.
        """
        # Validate before any plugin hears "fit started".
        check_epochs(epochs)
        check_loader(train_loader, "train_loader")
        if val_loader is not None:
            check_loader(val_loader, "val_loader")
        hook = get_plugin_manager().hook
        teacher_mode, student_mode = self.teacher.training, self.student.training
        self._plan.attach()
        try:
            if self.optimizer is None:
                batches = iter(train_loader)
                first = next(batches, None)
                if first is None:
                    raise ValueError("train_loader is empty: it yields no batches")
                self.setup(unpack_batch(first, self.device)[0])
                if batches is train_loader:  # a one-shot iterator: do not lose the batch we looked at
                    train_loader = itertools.chain([first], batches)
            # eval(): dropout off and BatchNorm statistics frozen, so the teacher's targets are
            # deterministic and its buffers never change.
            self.teacher.eval()
            hook.distillx_on_fit_start(distiller=self)
            history = run_epochs(
                self.student, train_loader, epochs, self._losses, self.optimizer, self.device,
                val_loader=val_loader, val_loss_fn=self.task_loss,
                on_epoch_end=lambda epoch, metrics: hook.distillx_on_epoch_end(
                    distiller=self, epoch=epoch, metrics=metrics))
        finally:
            self.teacher.train(teacher_mode)
            self.student.train(student_mode)
            self._plan.close()
        self.history.extend(history)
        hook.distillx_on_fit_end(distiller=self, metrics=dict(history[-1]))
        return history

    def evaluate(self, loader: Iterable, model: Optional[nn.Module] = None) -> dict[str, float]:
        """Accuracy and task loss of ``model`` (default the student) on ``loader``."""
        return evaluate(self.student if model is None else model, loader, self.task_loss, self.device)

    def close(self) -> None:
        """Remove the feature hooks from both models and drop captured features (idempotent)."""
        self._plan.close()

    def __enter__(self) -> "Distiller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def extractors(self) -> dict[str, Optional[FeatureExtractor]]:
        """``{"student": ..., "teacher": ...}``: the feature extractors (None for a side without features)."""
        return dict(self._plan.extractors)

    # -- internals -------------------------------------------------------------------------------
    def _pending_setup(self) -> list[Method]:
        return [m for m in self.methods if m.needs_setup]

    def _move_methods(self) -> None:
        for m in self.methods:
            if isinstance(m, nn.Module):  # methods with learned parts (adapters) train on the same device
                m.to(self.device)

    def _trainable_parameters(self) -> list[nn.Parameter]:
        """Student parameters, then each method's extra parameters, without duplicates."""
        params, seen = [], set()
        for p in [*self.student.parameters(), *(q for m in self.methods for q in m.parameters())]:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def _forward(self, inputs: torch.Tensor):
        """Teacher (no grad) then student forward; returns (student logits, student features,
        teacher logits, teacher features)."""
        # no_grad rather than inference_mode: inference tensors cannot be saved for backward, and
        # some method losses (e.g. F.mse_loss) save their teacher-side input.
        with torch.no_grad():
            teacher_logits = logits_of(self.teacher(inputs), "teacher")
        teacher_feats = self._plan.collect("teacher")
        student_logits = logits_of(self.student(inputs), "student")
        student_feats = self._plan.collect("student")
        return student_logits, student_feats, teacher_logits, teacher_feats

    def _losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted loss terms of one batch; ``loss`` is their sum."""
        outs = self._forward(inputs)
        student_logits = outs[0]
        batch = (inputs, targets)
        terms: dict[str, torch.Tensor] = {}
        zero = student_logits.new_zeros(())
        # A zero weight skips the computation: a non-finite loss times 0 would still be NaN.
        terms[TASK] = self.task_weight * self.task_loss(student_logits, targets) if self.task_weight else zero
        for i, (key, m) in enumerate(zip(self._keys, self.methods)):
            if m.weight:
                s, t = self._plan.views(i, *outs)
                terms[key] = m.weight * m.loss(s, t, batch)
            else:
                terms[key] = zero
        if self.check_finite:
            self._check_finite(terms, outs)
        return {"loss": sum(terms.values()), **terms}

    def _check_finite(self, terms: dict[str, torch.Tensor], outs) -> None:
        flags = torch.stack([torch.isfinite(t.detach()).all() for t in terms.values()])
        if bool(flags.all()):  # the one synchronisation per step
            return
        bad = [key for key, ok in zip(terms, flags.tolist()) if not ok]
        for key in bad:
            if key == TASK:
                where = " (the student logits hold NaN/inf)" if not bool(torch.isfinite(outs[0]).all()) else ""
                raise NonFiniteLossError(f"the task loss is {terms[key].item()}{where}; stopped before the "
                                         "optimizer step")
            i = self._keys.index(key)
            problem = self._plan.non_finite(i, outs)
            raise NonFiniteLossError(f"method {key!r}: its loss is {terms[key].item()}"
                                     + (f"; {problem}" if problem else " although its inputs are finite")
                                     + "; stopped before the optimizer step")


class _FeaturePlan:
    """Which features each method needs, how they map to the two extractors, and their views.

    Capture keys are ``"<method key>.<request key>"``; a request identical to an earlier one (same
    path, capture, selection and reduction on that side) reuses the earlier capture.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, methods: Sequence[Method], keys: Sequence[str]):
        self.models = {"student": student, "teacher": teacher}
        self.keys = list(keys)
        self.requests: list[list] = []
        # per method: {side: {request key: capture key}}
        self.maps: list[dict[str, dict[str, str]]] = []
        specs: dict[str, dict[str, FeatureSpec]] = {side: {} for side in SIDES}
        self.paths: dict[str, dict[str, str]] = {side: {} for side in SIDES}  # capture key -> layer path
        for mkey, m in zip(keys, methods):
            requests = list(m.features())
            self.requests.append(requests)
            mapping: dict[str, dict[str, str]] = {side: {} for side in SIDES}
            seen_keys = set()
            for req in requests:
                if req.key == "logits":
                    raise ValueError(f"method {mkey!r}: feature key 'logits' is reserved for the model outputs")
                if req.key in seen_keys:
                    raise ValueError(f"method {mkey!r}: two feature requests share the key {req.key!r}")
                seen_keys.add(req.key)
                for side in SIDES:
                    try:
                        spec = FeatureSpec.from_request(req, side)
                    except (TypeError, ValueError) as e:
                        raise type(e)(f"method {mkey!r}, feature {req.key!r}: bad {side} request "
                                      f"{req.path(side)!r}: {e}") from None
                    if spec.path != PENULTIMATE:
                        try:
                            resolve_module(self.models[side], spec.path, name=side)
                        except FeaturePathError as e:
                            raise FeaturePathError(f"method {mkey!r}, feature {req.key!r}: unknown {side} layer "
                                                   f"{spec.path!r}: {e}") from None
                    bare = spec.with_key("_")
                    existing = next((k for k, v in specs[side].items() if v.with_key("_") == bare), None)
                    if existing is None:
                        existing = f"{mkey}.{req.key}"
                        specs[side][existing] = spec.with_key(existing)
                        self.paths[side][existing] = spec.shorthand
                    mapping[side][req.key] = existing
            self.maps.append(mapping)
        self.extractors: dict[str, Optional[FeatureExtractor]] = {
            side: FeatureExtractor(self.models[side], specs[side], name=side, detach=side == "teacher")
            if specs[side] else None for side in SIDES}

    def attach(self) -> None:
        for ex in self.extractors.values():
            if ex is not None and not ex.attached:
                ex.attach()

    def close(self) -> None:
        for ex in self.extractors.values():
            if ex is not None:
                ex.close()
                ex.clear()

    def collect(self, side: str) -> dict:
        ex = self.extractors[side]
        if ex is None:
            return {}
        try:
            return ex.collect()
        except MissingFeatureError as e:
            users = []
            for mkey, mapping in zip(self.keys, self.maps):
                for rkey, ckey in mapping[side].items():
                    try:
                        ex[ckey]
                    except MissingFeatureError:
                        users.append(f"method {mkey!r} (feature {rkey!r}, {side} layer {self.paths[side][ckey]!r})")
            raise MissingFeatureError(f"{e}. Needed by: {'; '.join(users)}") from None

    def views(self, i: int, student_logits, student_feats, teacher_logits, teacher_feats):
        """The ``(student, teacher)`` dicts method ``i`` receives, under its own keys."""
        s = {"logits": student_logits}
        t = {"logits": teacher_logits}
        for rkey, ckey in self.maps[i]["student"].items():
            s[rkey] = student_feats[ckey]
        for rkey, ckey in self.maps[i]["teacher"].items():
            t[rkey] = teacher_feats[ckey]
        return s, t

    def non_finite(self, i: int, outs) -> Optional[str]:
        """Where method ``i``'s inputs hold NaN/inf, teacher first, or None."""
        student_logits, student_feats, teacher_logits, teacher_feats = outs
        for side, logits, feats in (("teacher", teacher_logits, teacher_feats),
                                    ("student", student_logits, student_feats)):
            for rkey, ckey in self.maps[i][side].items():
                value = feats[ckey]
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    return (f"the {side} feature {rkey!r} captured at {side} layer {self.paths[side][ckey]!r} "
                            "holds NaN/inf values")
            if not bool(torch.isfinite(logits).all()):
                return f"the {side} logits hold NaN/inf values"
        return None


def _apply_transfer(transfer, teacher: nn.Module, student: nn.Module):
    """Run ``transfer`` (a name, a Transfer or a callable) on the models; return its report or None."""
    if transfer is None:
        return None
    from . import transfer as transfers

    if isinstance(transfer, str):
        transfer = transfers.Transfer(transfer)
    if isinstance(transfer, transfers.Transfer) and transfer.n is not None:
        raise ValueError(f"transfer={transfer.name!r} with n={transfer.n} makes an ensemble of students; the "
                         "Distiller trains one student: drop n= (or distil each ensemble member separately)")
    if not callable(transfer):
        raise TypeError("transfer must be a strategy name, a distillx.transfer.Transfer or a callable "
                        f"(teacher, student) -> TransferReport, got {type(transfer).__name__}")
    report = transfer(teacher, student)
    if not isinstance(report, transfers.TransferReport):
        raise TypeError(f"transfer returned {type(report).__name__}, expected a TransferReport")
    return report


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
