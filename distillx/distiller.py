"""The Distiller: train a student on the task loss plus weighted distillation losses from a teacher.

    import distillx as dx
    d = dx.Distiller(teacher, student, methods=[dx.method("kd", T=4.0, weight=0.9),
                                                dx.method("at", student="layer2", teacher="layer3", weight=1000.0)],
                     transfer="select", checkpoint_dir="runs/a")
    history = d.fit(train_loader, epochs=20, val_loader=val_loader, teacher_epochs=0)

Phases: with ``teacher_epochs > 0`` (or :meth:`Distiller.train_teacher`) an untrained teacher is
trained first on the task loss (its own optimizer and schedule); then the weight transfer (if any)
initialises the student; then distillation. Both phases run the same setup (:mod:`distillx.engine.phases`)
and the engine's epoch loop (:mod:`distillx.engine.loop`); each: AdamW (lr 1e-3) with linear warm-up
over 5% of the steps and cosine decay by default. A distillation step is
:class:`distillx.engine.step.DistillStep` (both models' forward passes, the methods' losses,
weights, non-finite diagnostics); after the augmentations both models see the same batch.

This module is a facade over the engine: argument checks (:mod:`~distillx.engine.arguments`),
checkpoints (:mod:`~distillx.engine.checkpoint`), DDP (:mod:`~distillx.engine.distributed`), the
feature plan (:mod:`~distillx.engine.plan`) and the teacher cache
(:func:`distillx.teacher_cache.cache_for_run`).

Every term is logged per step and per epoch (``d.metrics``, a
:class:`~distillx.reporting.MetricsLog`; ``d.save_metrics(path)`` JSON, ``d.plot(path)`` PNG); a
progress bar shows them on a terminal. ``checkpoint_dir``: a checkpoint after every epoch and on
SIGINT/SIGTERM (then :class:`~distillx.engine.TrainingInterrupted` is raised), written atomically;
``fit(..., resume=path or True)`` continues exactly where it stopped (bitwise on CPU). ``amp``:
``"bf16"`` autocast on CPU and CUDA, ``"fp16"`` with a gradient scaler on CUDA. Under ``torchrun``
the student and the methods' adapters are wrapped in DistributedDataParallel (or sharded with
FSDP2: ``strategy="fsdp"``), the teacher is not (unless ``shard_teacher``), the loaders are sharded,
metrics summed over ranks and only rank 0 writes files.

Features: hooks by dotted path, attached at construction (so before any ``torch.compile``'d
call), removed at the end of :meth:`fit` and by :meth:`close`. Adapters that depend on feature
shapes (``sld``) are built from a dry forward pass (``example_inputs=`` or the first batch) before
the optimizer. Checks: an unknown layer path fails at construction naming the method and the
layer; a non-finite loss stops training before the optimizer step naming the phase, epoch, step,
the method and, when a feature holds NaN/inf, the model and layer; the last checkpoint is kept.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from . import _checks
from .compose import Composed
from .features import FeatureSpec, Trunk
from .engine.arguments import (REWRITE_SEED_OFFSET, TASK, apply_transfer, balancer, build_augmentations,
                               build_loggers, cache_options, check_amp, check_grad_clip, check_methods,
                               check_models, check_rewriting, check_strategy, check_transfer_target, check_weight,
                               method_name, metric_keys, student_input_spec)
from .engine.batches import (LABELS, call_model, causal_lm_loss, check_loader, task_cross_entropy, to_device,
                             unpack_batch)
from .engine.distributed import init_from_env
from .engine.signals import SignalGuard
from .engine.phases import Phases
from .engine.plan import FeaturePlan
from .engine.schedules import check_weight_schedules
from .engine.step import STUDENT_INPUT, DistillStep, NonFiniteLossError
from .engine.training import OptimizerSpec, build_optimizer, check_epochs, evaluate, resolve_device
from .hf.pretrained import is_causal_lm, save_model
from .methods import Method
from .reporting import MetricsLog, plot_metrics

__all__ = ["Distiller", "NonFiniteLossError"]


class Distiller(Phases):
    """Distil ``teacher`` into ``student`` with ``methods`` (built by :func:`distillx.method`).

    Args:
        teacher: the teacher. Only read during distillation (``eval()``, ``no_grad``, never in the
            optimizer); trained first when :meth:`fit` gets ``teacher_epochs > 0``.
        student: the model to train; moved to ``device``.
        methods: distillation methods, e.g. ``[distillx.method("kd", T=4.0, weight=0.9)]``.
        task_loss: ``(student_logits, targets) -> Tensor``; default cross-entropy (soft (N, C) targets
            of mixup/cutmix too; token logits (B, L, C) with (B, L) labels, ``-100`` ignored), the
            next-token loss for a causal LM student (``*ForCausalLM``). Applied to batches with targets.
        task_weight: weight of the task loss (0 disables it: pure distillation).
        optimizer: ``None`` (AdamW, lr 1e-3), a factory ``params -> Optimizer``, or an optimizer
            that already holds the student's and the methods' parameters.
        device: where to train; default the student's device.
        example_inputs: a batch's model inputs (a tensor, a tuple or a mapping) for the dry forward pass
            that builds shape-dependent adapters now.
        check_finite: stop with :class:`~distillx.engine.NonFiniteLossError` on a NaN/inf loss term (one device
            synchronisation per step).
        transfer: initialise the student from the teacher's weights at the start of distillation: a
            strategy name (``"select"``), a :class:`distillx.transfer.Transfer`
            (``dx.transfer("head_fit", calibration=loader)``) or a callable
            ``(teacher, student) -> TransferReport``; the report is ``d.transfer_report``. Refused for
            a PEFT student (its base is frozen): transfer into the base model before ``get_peft_model``.
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
        student_input: a student that consumes the teacher's features: the student is called on the
            teacher's feature at this cut (``"layer3"``, ``"penultimate"``, ``"blocks.2@input"``,
            ``"encoder:0"``, or a :class:`~distillx.features.FeatureSpec` with a reduction) instead of
            the batch inputs. The feature must be a tensor: at a layer whose output is a tuple, select
            one element (``"encoder:0"``), unless the student sets ``distillx_whole_inputs = True`` to
            take the tuple as it is. The teacher runs (``no_grad``, ``eval()``) only up to the cut unless a
            method reads its logits or later features; with ``cache_teacher=True`` the cut features
            are cached and training runs only the student. ``d.composed`` (teacher trunk + student)
            is what :meth:`evaluate` and validation run, and what :func:`distillx.compose` deploys.
        strategy: under ``torchrun``, ``"ddp"`` (the student and the adapters replicated in
            DistributedDataParallel) or ``"fsdp"`` (sharded with FSDP2 per block; bf16 ``amp`` becomes
            FSDP2's mixed-precision policy; checkpoints are distributed checkpoints that load back at any
            world size; needs an optimizer factory). ``shard_teacher``: with ``"fsdp"``, shard the teacher
            too for its forward passes instead of replicating it.
        label_key: the targets of mapping batches (default ``"labels"``; the other keys are inputs).
        balance: ``None`` (default: the weights as given) or ``"auto"``: loss terms that balance
            themselves (:mod:`distillx.engine.balance`). Every ``balance_every`` steps (default
            10 x (active terms - 1)) each term's gradient on the student is measured, and every term
            but the primary one gets the factor max(0, cos) x min(1, |g_primary| / |g_term|): a term
            that conflicts with the primary is switched off, an aligned one counts in proportion to
            its alignment (Du et al. 2018) and never pushes harder than the primary; ``weight=``
            stays a preference on top. ``balance_primary``: the primary term (``"task"`` or a
            method's key; default the first method): put the term you trust most first. The factors
            are logged per step (``weight/<term>``) and saved in checkpoints.
        loggers: metrics loggers that receive every step record (each term, the total, ``lr``) and
            epoch record (validation included) of both phases, as ``d.metrics`` does: registered
            names (``"tensorboard"``: scalars under ``<checkpoint_dir>/tensorboard``, the
            ``tensorboard`` extra), ``{"name": "tensorboard", "log_dir": ...}`` mappings with options,
            or objects with ``log_step``/``log_epoch`` (:class:`distillx.loggers.Logger`). Plugins
            register more (``distillx_register_loggers``). Only rank 0 builds and calls them; a logger
            that raises is dropped with a warning and training goes on; :meth:`close` closes them.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, methods: Optional[Sequence[Method]] = (),
                 task_loss: Optional[Callable] = None, task_weight: float = 1.0,
                 optimizer: OptimizerSpec = None, device: Union[None, str, torch.device] = None,
                 example_inputs: Any = None, check_finite: bool = True,
                 transfer: Union[None, str, Callable] = None, *,
                 scheduler: Any = "cosine", warmup: Union[int, float] = 0.05,
                 teacher_optimizer: OptimizerSpec = None, teacher_scheduler: Any = "cosine",
                 teacher_warmup: Union[int, float] = 0.05, weight_schedules: Optional[dict] = None,
                 augmentations: Sequence = (), amp: Optional[str] = None, grad_clip: Optional[float] = None,
                 cache_teacher: bool = False, cache_dir: Optional[str] = None, cache_dtype: str = "float16",
                 cache_top_k: Optional[int] = None, checkpoint_dir: Optional[str] = None,
                 progress: Optional[bool] = None, seed: Optional[int] = None, label_key: str = LABELS,
                 student_input: Union[None, str, FeatureSpec] = None, strategy: str = "ddp",
                 shard_teacher: bool = False, balance: Optional[str] = None, balance_primary: Optional[str] = None,
                 balance_every: Optional[int] = None, loggers: Any = None):
        check_models(teacher, student)
        check_transfer_target(transfer, student)
        self.methods = check_methods(methods)
        self.task_weight = check_weight(task_weight, "task_weight")
        if self.task_weight == 0 and not any(m.weight != 0 for m in self.methods) and not weight_schedules:
            raise ValueError("task_weight is 0 and no method has a non-zero weight: there is nothing to train")
        if task_loss is not None and not callable(task_loss):
            raise TypeError(f"task_loss must be callable (logits, targets) -> Tensor, got {type(task_loss).__name__}")
        if not isinstance(label_key, str) or not label_key:
            raise TypeError(f"label_key must be a non-empty string (the targets' key in mapping batches), got {label_key!r}")
        self.label_key = label_key
        self.task_loss = task_loss if task_loss is not None else (
            causal_lm_loss if is_causal_lm(student) else task_cross_entropy)
        self.device = resolve_device(student, device)
        self.amp = check_amp(amp, self.device)
        self.strategy, self.shard_teacher = check_strategy(strategy, shard_teacher, optimizer)
        self.grad_clip = check_grad_clip(grad_clip)
        self.teacher = teacher.to(self.device)
        self.student = student.to(self.device)
        self._transfer, self._transfer_done, self.transfer_report = transfer, transfer is None, None
        self._move_methods()
        self._keys = metric_keys(self.methods)
        self.weight_schedules = check_weight_schedules(weight_schedules, [TASK, *self._keys])
        self.augmentations = build_augmentations(augmentations)
        self._cache_opts = cache_options(cache_teacher, self.augmentations, cache_dir, cache_dtype, cache_top_k)
        self.cache_teacher = self._cache_opts is not None
        self.checkpoint_dir, self.progress = checkpoint_dir, progress
        self._phase_specs = {"student": (optimizer, scheduler, warmup),
                             "teacher": (teacher_optimizer, teacher_scheduler, teacher_warmup)}
        self.ctx = init_from_env(self.device)
        self.loggers = build_loggers(loggers, checkpoint_dir, self.ctx.is_main)
        loss_balancer = balancer(balance, balance_primary, balance_every, self.task_weight, self.methods, self._keys,
                                 self.weight_schedules, self.strategy, self.ctx)
        # Not drawn from the global generator: constructing a Distiller must not shift the user's
        # randomness. One stream per rank: each rank augments its own shard.
        gen_seed = torch.initial_seed() if seed is None else int(seed)
        self.aug_generator = torch.Generator().manual_seed(gen_seed + self.ctx.rank)
        self.student_input = student_input_spec(student_input, self.teacher)
        extra = {STUDENT_INPUT: self.student_input} if self.student_input is not None else None
        self._plan = FeaturePlan(self.teacher, self.student, self.methods, self._keys, teacher_extra=extra)
        self._plan.attach()
        self._step = DistillStep(self.teacher, self.student, self.methods, self._keys, self._plan, self.task_loss,
                                 self.task_weight, self.weight_schedules, bool(check_finite), self.device)
        self._step.balancer = loss_balancer
        rewriting = [method_name(m) for m in self.methods if m.rewrites_batch]
        if rewriting:
            check_rewriting(rewriting, self._cache_opts, self.strategy)
            # Its own stream (per rank), apart from the augmentations', so adding a method that
            # samples does not change what an augmentation draws.
            self._step.generator = torch.Generator().manual_seed(gen_seed + self.ctx.rank + REWRITE_SEED_OFFSET)
        # The teacher's layers after a cut run only when a method reads its logits or later features.
        later = [k for k in self._plan.capture_keys("teacher") if k != STUDENT_INPUT]
        self._step.full_teacher = any(m.uses_logits for m in self.methods) or bool(later)
        self.composed: Optional[Composed] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._parallel: Optional[nn.Module] = None  # the DDP wrapper or the FSDP-sharded student
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

    @property
    def check_finite(self) -> bool:
        return self._step.check_finite

    # -- public API ------------------------------------------------------------------------------
    def setup(self, inputs: Any) -> torch.optim.Optimizer:
        """Build the methods' shape-dependent parts (adapters) from one dry forward pass on ``inputs``
        (a batch's model inputs: a tensor, a tuple or a mapping), then the optimizer over the
        student's and the methods' parameters; return the optimizer.

        Both models run in ``eval()`` mode under ``no_grad`` (BatchNorm statistics do not move);
        their modes are restored. :meth:`fit` calls this on its first batch when needed.
        """
        if inputs is None:
            raise TypeError("inputs must be a batch of model inputs (a tensor, a tuple or a mapping), got None")
        pending = self._pending_setup()
        new_trunk = self.student_input is not None and self._step.trunk is None
        if pending or new_trunk:
            inputs = to_device(inputs, self.device)
            self._plan.attach()
            modes = [(m, m.training) for m in (self.teacher, self.student)]
            try:
                self.teacher.eval()
                self.student.eval()
                if new_trunk:  # traced in eval(): a graph trunk bakes in the modes it saw
                    self._step.trunk = Trunk(self.teacher, self.student_input, example_inputs=(
                        inputs if isinstance(inputs, Mapping) else (inputs,)))
                    self.composed = Composed(self._step.trunk, self.student)
                with torch.no_grad():
                    outs = self._dry_forward(inputs)
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
            self.optimizer = build_optimizer(self._phase_specs["student"][0], self._trainable_parameters())
        return self.optimizer

    def _dry_forward(self, inputs):
        """The step's forward on one batch; a student that cannot take the teacher's cut feature is
        reported with that feature's shape."""
        if self.student_input is None:
            return self._step.forward(inputs, None, live_teacher=True)
        try:
            return self._step.forward(inputs, None, live_teacher=True)
        except RuntimeError as exc:
            feature = call_model(self._step.trunk, inputs, "teacher")
            shape = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature).__name__
            raise ValueError(f"student_input={self._step.trunk.at!r}: the student cannot take the teacher's feature "
                             f"there, of shape {shape} ({type(exc).__name__}: {exc})") from exc

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
        with SignalGuard():
            self._check_ranks_agree("train_teacher", train_loader, val_loader, epochs=epochs, resume=resume)
            state, position = self._resume_state(resume, "teacher", train_loader, val_loader)
            return self._teacher_phase(train_loader, epochs, val_loader, state, position)

    def fit(self, train_loader: Iterable, epochs: int = 1, val_loader: Optional[Iterable] = None, *,
            teacher_epochs: int = 0, resume: Union[None, bool, str] = None) -> list[dict[str, float]]:
        """Train the teacher first if ``teacher_epochs`` > 0, apply the transfer, then distil for
        ``epochs`` epochs (default 1) over ``train_loader``; return the student's per-epoch metrics.

        ``resume``: a checkpoint path, or True for ``<checkpoint_dir>/checkpoint.pt``; the run then
        continues from the saved phase, epoch and step. Fires the plugin events
        ``distillx_on_fit_start``, ``distillx_on_epoch_end`` and ``distillx_on_fit_end``.
        """
        check_epochs(epochs)
        _checks.integer("teacher_epochs", teacher_epochs, ge=0)
        check_loader(train_loader, "train_loader")
        if val_loader is not None:
            check_loader(val_loader, "val_loader")
        # SIGINT/SIGTERM from here on, in setup too (transfer, dry forward pass, teacher cache), stop
        # at the next step boundary with a checkpoint (engine/loop.py).
        with SignalGuard():
            # Before the first collective: ranks that disagree would hang in the first one that differs.
            self._check_ranks_agree("fit", train_loader, val_loader, epochs=epochs, teacher_epochs=teacher_epochs,
                                    resume=resume)
            state, position = self._resume_state(resume, None, train_loader, val_loader)
            if state is not None and state["phase"] == "teacher":
                self._teacher_phase(train_loader, teacher_epochs, val_loader, state, position)
                state = position = None
            elif state is None and teacher_epochs:
                self._teacher_phase(train_loader, teacher_epochs, val_loader, None, None)
            return self._student_phase(train_loader, epochs, val_loader, state, position)

    def evaluate(self, loader: Iterable, model: Optional[nn.Module] = None) -> dict[str, Optional[float]]:
        """Accuracy and task loss of ``model`` (default the student) on ``loader``, over its labelled
        targets (both None when it has none; see :func:`distillx.engine.training.evaluate`)."""
        return evaluate(self._student_model() if model is None else model, loader, self.task_loss, self.device,
                        self.label_key)

    def losses(self, batch: Any) -> dict[str, torch.Tensor]:
        """The loss terms of one batch as a training step computes them (``"loss"`` is the total, with
        its graph), without augmentations or an optimizer step; the models keep their modes."""
        if self.optimizer is None:
            self.setup(unpack_batch(batch, self.device, self.label_key)[0])
        self._plan.attach()
        return self._step(*unpack_batch(batch, self.device, self.label_key))

    def save_student(self, path: str, tokenizer: Any = None, merge: bool = False) -> str:
        """Write the student: a transformers ``PreTrainedModel`` with ``save_pretrained(path)`` (and
        ``tokenizer.save_pretrained(path)``), loadable by ``AutoModel.from_pretrained(path)``; any other
        model's ``state_dict`` to the file ``path``. A PEFT student writes its adapter
        (``PeftModel.from_pretrained(base, path)``), or with ``merge=True`` its adapters merged into a
        copy of the base model (``AutoModel*.from_pretrained(path)``; the student is not changed);
        ``merge=True`` on another student is a ``ValueError``. Only rank 0 writes. Returns ``path``."""
        if self.ctx.is_main:
            # A merge deep-copies the student: without the feature hooks (they would be copied with
            # the extractors they call), which come back as they were.
            hooked = [ex for ex in self._plan.extractors.values() if merge and ex is not None and ex.attached]
            for ex in hooked:
                ex.close()
            try:
                save_model(self.student, path, tokenizer, merge=merge)
            finally:
                for ex in hooked:
                    ex.attach()
        return path

    def save_metrics(self, path: str) -> str:
        """Write every logged step and epoch metric as JSON (atomically); return ``path``."""
        if self.ctx.is_main:
            self.metrics.save_json(path)
        return path

    def plot(self, path: str) -> str:
        """Write a PNG of the loss components and validation accuracy per epoch of both phases."""
        if self.ctx.is_main:
            plot_metrics(self.metrics, path)
        return path

    def close(self) -> None:
        """Remove the feature hooks from both models and drop captured features; close the metrics
        loggers (a later :meth:`fit` opens them again). Idempotent."""
        self._plan.close()
        if getattr(self, "loggers", None) is not None:  # close() also runs when __init__ failed early
            self.loggers.close()

    def __enter__(self) -> "Distiller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def extractors(self):
        """The student's and the teacher's :class:`FeatureExtractor` (None where nothing is captured)."""
        return dict(self._plan.extractors)
