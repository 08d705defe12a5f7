"""The Distiller: train a student on the task loss plus weighted distillation losses from a teacher.

    import distillx as dx
    d = dx.Distiller(teacher, student, methods=[dx.method("kd", T=4.0, weight=0.9),
                                                dx.method("at", student="layer2", teacher="layer3", weight=1000.0)],
                     transfer="select", checkpoint_dir="runs/a")
    history = d.fit(train_loader, epochs=20, val_loader=val_loader, teacher_epochs=0)

Phases: with ``teacher_epochs > 0`` (or :meth:`Distiller.train_teacher`) an untrained teacher is
trained first on the task loss (its own optimizer and schedule); then the weight transfer (if any)
initialises the student; then distillation. Each phase: AdamW (lr 1e-3) with linear warm-up over
5% of the steps and cosine decay by default.

Per batch ``(inputs, targets)`` of distillation, after the augmentations (both models see the
augmented batch):

    loss = w_task(e) · task_loss(student_logits, targets) + Σ_i w_i(e) · method_i.loss(s_i, t_i, batch)

with ``w(e)`` the term's weight, or its schedule's value at the fractional epoch ``e``
(``weight_schedules``); ``s_i``/``t_i`` hold the logits and the features method ``i`` asked for
(:meth:`Method.features`) under its own keys. The teacher runs in ``eval()`` mode under
``torch.no_grad()``, or not at all with ``cache_teacher=True``: its logits and captured features
are computed once over the training set, kept memory-mapped on disk and looked up by sample index.

Every term is logged per step and per epoch (``d.metrics``, a
:class:`~distillx.reporting.MetricsLog`; ``d.save_metrics(path)`` JSON, ``d.plot(path)`` PNG); a
progress bar shows them on a terminal. ``checkpoint_dir``: a checkpoint after every epoch and on
SIGINT/SIGTERM (then :class:`~distillx.engine.TrainingInterrupted` is raised), written atomically;
``fit(..., resume=path or True)`` continues exactly where it stopped (bitwise on CPU). ``amp``:
``"bf16"`` autocast on CPU and CUDA, ``"fp16"`` with a gradient scaler on CUDA. Under ``torchrun``
the student and the methods' adapters are wrapped in DistributedDataParallel, the teacher is not,
the loaders are sharded, metrics summed over ranks and only rank 0 writes files.

Features: hooks by dotted path, attached at construction (so before any ``torch.compile``'d
call), removed at the end of :meth:`fit` and by :meth:`close`. Adapters that depend on feature
shapes (``sld``) are built from a dry forward pass (``example_inputs=`` or the first batch) before
the optimizer. Checks: an unknown layer path fails at construction naming the method and the
layer; a non-finite loss stops training before the optimizer step naming the phase, epoch, step,
the method and, when a feature holds NaN/inf, the model and layer; the last checkpoint is kept.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._atomic import save_atomic
from .engine import checkpoint as ckpt
from .engine.distributed import init_from_env, shard_loader
from .engine.arguments import (TASK, apply_transfer, build_augmentations, check_methods, check_weight, method_name,
                               metric_keys)
from .engine.loop import Phase, Runner, steps_per_epoch
from .engine.plan import FeaturePlan
from .engine.schedules import build_scheduler, check_weight_schedules
from .methods import Method
from .plugin import get_plugin_manager
from .training import (OptimizerSpec, build_optimizer, check_epochs, check_loader, evaluate, logits_of,
                       resolve_device, unpack_batch, validator)

AMP = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN/inf; the message names the method and, when a captured feature holds
    non-finite values, the model and layer."""


class _Trainable(nn.Module):
    """The student and the methods (their adapters) as one module, so DDP averages every gradient."""

    def __init__(self, student: nn.Module, methods: Sequence[Method]):
        super().__init__()
        self.student = student
        self.methods = nn.ModuleList(methods)

    def forward(self, inputs):
        return self.student(inputs)


class Distiller:
    """Distil ``teacher`` into ``student`` with ``methods`` (built by :func:`distillx.method`).

    Args:
        teacher: the teacher. Only read during distillation (``eval()``, ``no_grad``, never in the
            optimizer); trained first when :meth:`fit` gets ``teacher_epochs > 0``.
        student: the model to train; moved to ``device``.
        methods: distillation methods, e.g. ``[distillx.method("kd", T=4.0, weight=0.9)]``.
        task_loss: ``(student_logits, targets) -> Tensor``; default cross-entropy (which also takes
            the soft (N, C) targets of mixup/cutmix).
        task_weight: weight of the task loss (0 disables it: pure distillation).
        optimizer: ``None`` (AdamW, lr 1e-3), a factory ``params -> Optimizer``, or an optimizer
            that already holds the student's and the methods' parameters.
        device: where to train; default the student's device.
        example_inputs: a batch for the dry forward pass that builds shape-dependent adapters now.
        check_finite: stop with :class:`NonFiniteLossError` on a NaN/inf loss term (one device
            synchronisation per step).
        transfer: initialise the student from the teacher's weights at the start of distillation: a
            strategy name (``"select"``), a :class:`distillx.transfer.Transfer`
            (``dx.transfer("head_fit", calibration=loader)``) or a callable
            ``(teacher, student) -> TransferReport``; the report is ``d.transfer_report``.
        scheduler / warmup: the student phase's LR schedule, per step (``"cosine"``, ``"linear"``,
            ``"constant"``, ``None`` or a factory; :mod:`distillx.engine.schedules`); warm-up in
            steps (int) or as a fraction of all steps (float).
        teacher_optimizer / teacher_scheduler / teacher_warmup: the same for the teacher phase.
        weight_schedules: ``{"kd": dx.engine.linear(0, 1, epochs=5), "task": ...}``.
        augmentations: names of registered augmentations, :class:`distillx.augment.Augmentation`
            objects or callables ``(inputs, targets, generator) -> (inputs, targets)``, applied in
            order to every training batch (both phases).
        amp: ``None``, ``"bf16"`` or ``"fp16"`` (CUDA only).
        grad_clip: clip the gradient norm of the trained parameters to this value.
        cache_teacher: run the teacher once over the training set and reuse its outputs (offline
            distillation); refused with augmentations that change inputs. ``cache_dir`` (default
            ``<checkpoint_dir>/teacher_cache``), ``cache_dtype`` (``"float16"``/``"float32"``) and
            ``cache_top_k`` (keep only the k largest logits) shape the cache.
        checkpoint_dir: where ``checkpoint.pt`` (latest position) is written; None writes nothing.
        progress: progress bars (None: when stderr is a terminal and ``DISTILLX_QUIET`` is unset).
        seed: seeds the augmentation generator (default: ``torch.initial_seed()``).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, methods: Optional[Sequence[Method]] = (),
                 task_loss: Optional[Callable] = None, task_weight: float = 1.0,
                 optimizer: OptimizerSpec = None, device: Union[None, str, torch.device] = None,
                 example_inputs: Optional[torch.Tensor] = None, check_finite: bool = True,
                 transfer: Union[None, str, Callable] = None, *,
                 scheduler: Any = "cosine", warmup: Union[int, float] = 0.05,
                 teacher_optimizer: OptimizerSpec = None, teacher_scheduler: Any = "cosine",
                 teacher_warmup: Union[int, float] = 0.05, weight_schedules: Optional[dict] = None,
                 augmentations: Sequence = (), amp: Optional[str] = None, grad_clip: Optional[float] = None,
                 cache_teacher: bool = False, cache_dir: Optional[str] = None, cache_dtype: str = "float16",
                 cache_top_k: Optional[int] = None, checkpoint_dir: Optional[str] = None,
                 progress: Optional[bool] = None, seed: Optional[int] = None):
        for name, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
        if teacher is student:
            raise ValueError("teacher and student are the same module; the student needs its own parameters")
        shared = {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}
        if shared:
            raise ValueError(f"teacher and student share {len(shared)} parameter tensor(s); training the "
                             "student would change the teacher. Give the student its own copy.")
        self.methods = check_methods(methods)
        self.task_weight = check_weight(task_weight, "task_weight")
        if self.task_weight == 0 and not any(m.weight != 0 for m in self.methods) and not weight_schedules:
            raise ValueError("task_weight is 0 and no method has a non-zero weight: there is nothing to train")
        if task_loss is not None and not callable(task_loss):
            raise TypeError(f"task_loss must be callable (logits, targets) -> Tensor, got {type(task_loss).__name__}")
        self.task_loss = F.cross_entropy if task_loss is None else task_loss
        self.check_finite = bool(check_finite)
        self.device = resolve_device(student, device)
        if amp not in AMP:
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
        if amp == "fp16" and self.device.type != "cuda":
            raise ValueError("amp='fp16' needs CUDA (float16 training needs a gradient scaler); use amp='bf16' on CPU")
        self.amp = amp
        if grad_clip is not None and (isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float))
                                      or not grad_clip > 0):
            raise ValueError(f"grad_clip must be a number > 0 or None, got {grad_clip!r}")
        self.grad_clip = grad_clip
        self.teacher = teacher.to(self.device)
        self.student = student.to(self.device)
        self._transfer = transfer
        self._transfer_done = transfer is None
        self.transfer_report = None
        self._phase: Optional[Phase] = None
        self._move_methods()
        self._keys = metric_keys(self.methods)
        self.weight_schedules = check_weight_schedules(weight_schedules, [TASK, *self._keys])
        self.augmentations = build_augmentations(augmentations)
        self.cache_teacher = bool(cache_teacher)
        if self.cache_teacher:
            from .augment import any_changes_inputs
            if any_changes_inputs(self.augmentations):
                raise ValueError("cache_teacher=True stores the teacher's outputs for the original inputs, but "
                                 "augmentations that change the inputs are set, so the cached outputs would not "
                                 "match what the student sees; drop the augmentations or cache_teacher")
        if cache_dtype not in ("float16", "float32"):
            raise ValueError(f"cache_dtype must be 'float16' or 'float32', got {cache_dtype!r}")
        self._cache_opts = {"directory": cache_dir, "dtype": getattr(torch, cache_dtype), "top_k": cache_top_k}
        self._cache = None
        self.checkpoint_dir = checkpoint_dir
        self.progress = progress
        self._sched = {"student": (scheduler, warmup), "teacher": (teacher_scheduler, teacher_warmup)}
        self._teacher_optimizer_spec = teacher_optimizer
        # Not drawn from the global generator: constructing a Distiller must not shift the user's randomness.
        gen_seed = torch.initial_seed() if seed is None else int(seed)
        self.ctx = init_from_env(self.device)
        # One stream per rank: each rank augments its own shard.
        self.aug_generator = torch.Generator().manual_seed(gen_seed + self.ctx.rank)
        self._plan = FeaturePlan(self.teacher, self.student, self.methods, self._keys)
        self._plan.attach()
        self._optimizer_spec = optimizer
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._ddp = None
        from .reporting import MetricsLog
        self.metrics = MetricsLog()
        self.history: list[dict[str, float]] = []
        self.teacher_history: list[dict[str, float]] = []
        self._teacher_trained = False
        try:
            if not self._pending_setup():
                self.optimizer = build_optimizer(optimizer, self._trainable_parameters())
            elif example_inputs is not None:
                self.setup(example_inputs)
            elif isinstance(optimizer, torch.optim.Optimizer):
                raise ValueError(
                    f"method(s) {', '.join(repr(method_name(m)) for m in self._pending_setup())} build their adapters from "
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
                    outs = self._forward(inputs, None, live_teacher=True)
                    for i, m in enumerate(self.methods):
                        if m in pending:
                            m.setup(*self._plan.views(i, *outs))
            finally:
                for model, mode in modes:
                    model.train(mode)
            self._move_methods()
            still = self._pending_setup()
            if still:
                raise RuntimeError(f"method(s) {', '.join(repr(method_name(m)) for m in still)} still need setup after "
                                   "setup() ran (their needs_setup stayed True)")
        if self.optimizer is None:
            self.optimizer = build_optimizer(self._optimizer_spec, self._trainable_parameters())
        return self.optimizer

    def apply_transfer(self):
        """Apply ``transfer=`` now (once); :meth:`fit` does it before distilling. Returns the report."""
        if not self._transfer_done:
            self._plan.close()  # a transfer may run the models (head_fit) and deep-copies the student
            try:
                self.transfer_report = apply_transfer(self._transfer, self.teacher, self.student)
            finally:
                self._plan.attach()
            self._transfer_done = True
        return self.transfer_report

    def train_teacher(self, train_loader: Iterable, epochs: int, val_loader: Optional[Iterable] = None,
                      resume: Union[None, bool, str] = None) -> list[dict[str, float]]:
        """Phase 1: train the teacher on the task loss for ``epochs`` epochs; return its metrics."""
        check_epochs(epochs)
        state, position = self._resume_state(resume, "teacher")
        return self._teacher_phase(train_loader, epochs, val_loader, state, position)

    def fit(self, train_loader: Iterable, epochs: int, val_loader: Optional[Iterable] = None, *,
            teacher_epochs: int = 0, resume: Union[None, bool, str] = None) -> list[dict[str, float]]:
        """Train the teacher first if ``teacher_epochs`` > 0, apply the transfer, then distil for
        ``epochs`` epochs over ``train_loader``; return the student's per-epoch metrics.

        ``resume``: a checkpoint path, or True for ``<checkpoint_dir>/checkpoint.pt``; the run then
        continues from the saved phase, epoch and step. Fires the plugin events
        ``distillx_on_fit_start``, ``distillx_on_epoch_end`` and ``distillx_on_fit_end``.
        """
        check_epochs(epochs)
        if isinstance(teacher_epochs, bool) or not isinstance(teacher_epochs, int) or teacher_epochs < 0:
            raise ValueError(f"teacher_epochs must be an integer >= 0, got {teacher_epochs!r}")
        check_loader(train_loader, "train_loader")
        if val_loader is not None:
            check_loader(val_loader, "val_loader")
        state, position = self._resume_state(resume, None)
        if state is not None and state["phase"] == "teacher":
            self._teacher_phase(train_loader, teacher_epochs, val_loader, state, position)
            state = position = None
        elif state is None and teacher_epochs:
            self._teacher_phase(train_loader, teacher_epochs, val_loader, None, None)
        return self._student_phase(train_loader, epochs, val_loader, state, position)

    def evaluate(self, loader: Iterable, model: Optional[nn.Module] = None) -> dict[str, float]:
        """Accuracy and task loss of ``model`` (default the student) on ``loader``."""
        return evaluate(self.student if model is None else model, loader, self.task_loss, self.device)

    def save_metrics(self, path: str) -> str:
        """Write every logged step and epoch metric as JSON (atomically); return ``path``."""
        if self.ctx.is_main:
            self.metrics.save_json(path)
        return path

    def plot(self, path: str) -> str:
        """Write a PNG of the loss components and validation accuracy per epoch of both phases."""
        if self.ctx.is_main:
            from .reporting import plot_metrics
            plot_metrics(self.metrics, path)
        return path

    def close(self) -> None:
        """Remove the feature hooks from both models and drop captured features (idempotent)."""
        self._plan.close()

    def __enter__(self) -> "Distiller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def extractors(self):
        """The student's and the teacher's :class:`FeatureExtractor` (None where nothing is captured)."""
        return dict(self._plan.extractors)

    # -- phases ----------------------------------------------------------------------------------
    def _teacher_phase(self, train_loader, epochs, val_loader, state, position) -> list[dict]:
        check_loader(train_loader, "train_loader")
        loader = shard_loader(train_loader, self.ctx)
        params = [p for p in self.teacher.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the teacher has no trainable parameters: it cannot be trained")
        optimizer = build_optimizer(self._teacher_optimizer_spec, params)
        scheduler = build_scheduler(self._sched["teacher"][0], optimizer, _total_steps(loader, epochs),
                                    self._sched["teacher"][1])
        scaler = self._scaler()
        model = self.teacher
        if self.ctx.enabled:
            model = nn.parallel.DistributedDataParallel(self.teacher, **self._ddp_kwargs())
        if state is not None:
            self._load_common(state)
            optimizer.load_state_dict(state["optimizer"])
            _load_optional(scheduler, state.get("scheduler"), "scheduler")
            _load_optional(scaler, state.get("scaler"), "scaler")

        def losses(inputs, targets, indices):
            return {"loss": self.task_loss(logits_of(model(inputs), "teacher"), targets)}

        phase = Phase("teacher", [self.teacher], optimizer, loader, epochs, losses, self.device, scheduler, scaler,
                      AMP[self.amp], self.grad_clip, self._augment(), self.aug_generator,
                      validator(val_loader, self.teacher, self.task_loss, self.device), params=params)
        was_training = self.teacher.training
        base = len(self.teacher_history) if state is None else 0  # a resumed run returns its whole history
        self._plan.close()
        try:
            self._runner(phase, loader, optimizer, scheduler, scaler,
                         on_epoch_end=lambda epoch, metrics: self.teacher_history.append(metrics)).run(position)
        finally:
            self.teacher.train(was_training)
            self._plan.attach()
        self._teacher_trained = True
        return self.teacher_history[base:]

    def _student_phase(self, train_loader, epochs, val_loader, state, position) -> list[dict]:
        hook = get_plugin_manager().hook
        teacher_mode, student_mode = self.teacher.training, self.student.training
        if state is None:
            self.apply_transfer()
        loader = shard_loader(train_loader, self.ctx)
        self._plan.attach()
        try:
            if self.optimizer is None:
                batches = iter(loader)
                first = next(batches, None)
                if first is None:
                    raise ValueError("train_loader is empty: it yields no batches")
                self.setup(unpack_batch(first, self.device)[0])
                if batches is loader:  # a one-shot iterator: do not lose the batch we looked at
                    loader = itertools.chain([first], batches)
            if self.cache_teacher:
                loader = self._build_cache(loader)
            scheduler = build_scheduler(self._sched["student"][0], self.optimizer, _total_steps(loader, epochs),
                                        self._sched["student"][1])
            scaler = self._scaler()
            if self.ctx.enabled and self._ddp is None:
                self._ddp = nn.parallel.DistributedDataParallel(_Trainable(self.student, self.methods),
                                                                **self._ddp_kwargs())
            if state is not None:
                self._load_common(state)
                self.optimizer.load_state_dict(state["optimizer"])
                _load_optional(scheduler, state.get("scheduler"), "scheduler")
                _load_optional(scaler, state.get("scaler"), "scaler")
            # eval(): dropout off and BatchNorm statistics frozen, so the teacher's targets are
            # deterministic and its buffers never change.
            self.teacher.eval()
            hook.distillx_on_fit_start(distiller=self)
            phase = Phase("student", [self.student, *self.methods], self.optimizer, loader, epochs, self._losses,
                          self.device, scheduler, scaler, AMP[self.amp], self.grad_clip, self._augment(),
                          self.aug_generator, validator(val_loader, self.student, self.task_loss, self.device),
                          indexed=self._cache is not None, params=self._trainable_parameters())
            base = len(self.history) if state is None else 0  # a resumed run returns its whole history

            def on_epoch_end(epoch, metrics):
                self.history.append(metrics)  # before the checkpoint of this epoch is written
                hook.distillx_on_epoch_end(distiller=self, epoch=epoch, metrics=metrics)

            runner = self._runner(phase, loader, self.optimizer, scheduler, scaler, on_epoch_end=on_epoch_end)
            self._phase = phase
            runner.run(position)
        finally:
            self.teacher.train(teacher_mode)
            self.student.train(student_mode)
            self._plan.close()
        history = self.history[base:]
        hook.distillx_on_fit_end(distiller=self, metrics=dict(history[-1]) if history else {})
        return history

    def _runner(self, phase, loader, optimizer, scheduler, scaler, on_epoch_end=None) -> Runner:
        from .engine.checkpoint import loader_generators

        generators = loader_generators(loader) + [self.aug_generator]

        def save(name, position):
            if self.checkpoint_dir is None:
                return None
            path = os.path.join(self.checkpoint_dir, ckpt.FILENAME)
            save_atomic(self._checkpoint(name, position, optimizer, scheduler, scaler), path)
            return path

        return Runner(phase, self.ctx, save, self.metrics, self.progress, on_epoch_end, generators)

    # -- checkpoints -----------------------------------------------------------------------------
    def _checkpoint(self, phase: str, position: dict, optimizer, scheduler, scaler) -> dict:
        return {
            "format": ckpt.FORMAT, "version": ckpt.VERSION, "phase": phase, "position": position,
            "student": self.student.state_dict(), "methods": [m.state_dict() for m in self.methods],
            "method_keys": list(self._keys),
            "teacher": self.teacher.state_dict() if (self._teacher_trained or phase == "teacher") else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
            "scaler": scaler.state_dict() if scaler else None, "metrics": self.metrics.state_dict(),
            "history": {"teacher": self.teacher_history, "student": self.history},
            "transfer_report": self.transfer_report.to_dict() if self.transfer_report is not None else None,
        }

    def _resume_state(self, resume, want_phase: Optional[str]):
        state = ckpt.for_resume(resume, self.checkpoint_dir, want_phase, self._keys, self.student, self.teacher)
        return state, (state["position"] if state is not None else None)

    def _load_common(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        if state.get("teacher") is not None:
            self.teacher.load_state_dict(state["teacher"])
            self._teacher_trained = True
        for m, sd in zip(self.methods, state["methods"]):
            try:
                m.load_state_dict(sd)
            except RuntimeError as exc:
                raise ckpt.CheckpointError(f"checkpoint {state['path']!r}: method {method_name(m)!r} does not match its saved "
                                           f"state: {exc}") from exc
        self.metrics.load_state_dict(state["metrics"])
        self.teacher_history = list(state["history"]["teacher"])
        self.history = list(state["history"]["student"])
        if state["phase"] == "student":
            # The saved student already holds the transfer's result: never apply it a second time.
            self._transfer_done = True

    # -- pieces ----------------------------------------------------------------------------------
    def _scaler(self):
        if self.amp == "fp16":
            return torch.amp.GradScaler("cuda")
        return None

    def _ddp_kwargs(self) -> dict:
        if self.device.type == "cuda":
            return {"device_ids": [self.device.index if self.device.index is not None else torch.cuda.current_device()]}
        return {}

    def _augment(self):
        if not self.augmentations:
            return None
        from .augment import compose

        augs = self.augmentations
        return lambda inputs, targets, generator: compose(augs, inputs, targets, generator)

    def _build_cache(self, loader):
        from .teacher_cache import TeacherCache, indexed_loader

        opts = dict(self._cache_opts)
        directory = opts.pop("directory") or (os.path.join(self.checkpoint_dir, "teacher_cache")
                                              if self.checkpoint_dir else None)
        if directory is None:
            raise ValueError("cache_teacher=True needs a place for the cache: pass cache_dir= or checkpoint_dir=")
        indexed = indexed_loader(loader)
        was = self.teacher.training
        self.teacher.eval()

        def capture(inputs):
            logits = logits_of(self.teacher(inputs), "teacher")
            return {"logits": logits, **self._plan.collect("teacher")}

        keys = ["logits", *self._plan.capture_keys("teacher")]
        try:
            if self.ctx.is_main:
                # Iterating the cache's own loader draws a seed from the global generator: fork it, so
                # a run sees the same random stream with and without the cache.
                with torch.random.fork_rng(devices=[]):
                    self._cache = TeacherCache.build_or_open(self.teacher, indexed, directory, capture=capture,
                                                             device=self.device, expect_keys=keys, **opts)
            self.ctx.barrier()  # the other ranks open what rank 0 built
            if not self.ctx.is_main:
                self._cache = TeacherCache.open(directory, expect_keys=keys)
        finally:
            self.teacher.train(was)
        return indexed

    def _move_methods(self) -> None:
        # Adapters live with the student (built lazily, so move them whenever new ones appear).
        for m in self.methods:
            m.to(self.device)

    def _pending_setup(self) -> list[Method]:
        return [m for m in self.methods if m.needs_setup]

    def _trainable_parameters(self) -> list[nn.Parameter]:
        params, seen = [], set()
        for p in itertools.chain(self.student.parameters(), *(m.parameters() for m in self.methods)):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def _forward(self, inputs: torch.Tensor, indices=None, live_teacher: bool = False):
        if self._cache is not None and not live_teacher:
            cached = self._cache.lookup(indices, device=self.device)
            teacher_logits = cached.pop("logits")
            teacher_feats = {k: v for k, v in cached.items() if not k.startswith("topk_")}
        else:
            with torch.no_grad():
                teacher_logits = logits_of(self.teacher(inputs), "teacher")
            teacher_feats = self._plan.collect("teacher")
        student = self._ddp if self._ddp is not None else self.student
        student_logits = logits_of(student(inputs), "student")
        student_feats = self._plan.collect("student")
        return student_logits, student_feats, teacher_logits, teacher_feats

    def _weight(self, key: str, base: float) -> float:
        sched = self.weight_schedules.get(key)
        if sched is None:
            return base
        phase = self._phase
        return float(sched(phase.epoch_fraction if phase is not None else 0.0))

    def _losses(self, inputs: torch.Tensor, targets: torch.Tensor, indices=None) -> dict[str, torch.Tensor]:
        """Weighted loss terms of one batch; ``loss`` is their sum."""
        outs = self._forward(inputs, indices)
        student_logits = outs[0]
        batch = (inputs, targets)
        terms: dict[str, torch.Tensor] = {}
        zero = student_logits.new_zeros((), dtype=torch.float32)
        # A zero weight skips the computation: a non-finite loss times 0 would still be NaN.
        w = self._weight(TASK, self.task_weight)
        terms[TASK] = w * self.task_loss(student_logits, targets) if w else zero
        for i, (key, m) in enumerate(zip(self._keys, self.methods)):
            w = self._weight(key, m.weight)
            if w:
                s, t = self._plan.views(i, *outs)
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


def _total_steps(loader, epochs: int) -> int:
    return max(1, (steps_per_epoch(loader) or 1) * epochs)


def _load_optional(obj, state, what: str) -> None:
    if obj is None:
        return
    if state is None:
        raise ckpt.CheckpointError(f"the checkpoint has no {what} state but this run uses a {what}")
    obj.load_state_dict(state)
