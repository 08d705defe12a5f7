"""The Distiller's two phases and what they share (the mixin :class:`Phases` of
:class:`distillx.Distiller`, which holds the run's state: models, methods, step, plan, options).

- teacher phase: the teacher on the task loss (its own optimizer, schedule; DDP under torchrun),
  feature hooks detached;
- student phase: the transfer (once), adapters and a student-input trunk from one dry batch, the
  teacher cache, DDP/FSDP, then the loop over :class:`~distillx.engine.step.DistillStep`;
- :meth:`Phases._run_phase`, which both run: LR schedule, gradient scaler, the resumed state, the
  checkpoint callback (every rank calls it; rank 0 writes the file, FSDP ranks their shards), the
  epoch loop (:class:`~distillx.engine.loop.Runner`).
"""
from __future__ import annotations

import hashlib
import itertools
import os
from typing import Callable, Optional

import torch
from torch import nn

from ..augment import compose
from ..methods import Method
from ..plugin import get_plugin_manager
from ..teacher_cache import cache_for_run
from . import checkpoint as ckpt
from . import fsdp
from .arguments import AMP, method_name
from .batches import call_model, check_loader, logits_of, unpack_batch
from .distributed import check_same, parallelize, wrap
from .loop import Phase, Runner, steps_per_epoch
from .schedules import build_scheduler
from .sharding import shard_loader
from .training import build_optimizer, validator


class Phases:
    """The phase machinery of the Distiller (see the module docstring)."""

    # -- phases ----------------------------------------------------------------------------------
    def _teacher_phase(self, train_loader, epochs, val_loader, state, position) -> list[dict]:
        check_loader(train_loader, "train_loader")
        loader = shard_loader(train_loader, self.ctx)
        params = [p for p in self.teacher.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the teacher has no trainable parameters: it cannot be trained")
        optimizer = build_optimizer(self._phase_specs["teacher"][0], params)
        model = wrap(self.teacher, self.ctx, self.device)

        def losses(inputs, targets, indices):
            if targets is None:
                raise ValueError(f"training the teacher needs targets: a mapping batch has no {self.label_key!r}")
            return {"loss": self.task_loss(logits_of(call_model(model, inputs, "teacher"), "teacher"), targets)}

        was_training = self.teacher.training
        base = len(self.teacher_history) if state is None else 0  # a resumed run returns its whole history
        self._plan.close()
        try:
            self._run_phase("teacher", [self.teacher], params, optimizer, loader, epochs, losses, self.teacher,
                            val_loader, state, position, on_epoch_end=lambda e, m: self.teacher_history.append(m))
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
        elif state.get("teacher") is not None:
            # The teacher cache and the dry forward pass below read the teacher: they must see the
            # trained teacher of the checkpoint, not the weights this process started with.
            self.teacher.load_state_dict(state["teacher"])
        loader = shard_loader(train_loader, self.ctx)
        self._plan.attach()
        try:
            if self.optimizer is None or (self.student_input is not None and self._step.trunk is None):
                batches = iter(loader)
                first = next(batches, None)
                if first is None:
                    raise ValueError("train_loader is empty: it yields no batches")
                self.setup(unpack_batch(first, self.device, self.label_key)[0])
                if batches is loader:  # a one-shot iterator: do not lose the batch we looked at
                    loader = itertools.chain([first], batches)
            if self._cache_opts is not None:
                opts = dict(self._cache_opts)
                self._step.cache, loader = cache_for_run(
                    self.teacher, loader, directory=opts.pop("directory"), checkpoint_dir=self.checkpoint_dir,
                    feature_keys=self._plan.capture_keys("teacher"), collect=lambda: self._plan.collect("teacher"),
                    captures=self._plan.describe("teacher"),
                    ctx=self.ctx, device=self.device, run=self._step.cache_forward,
                    with_logits=self._step.teacher_logits_used(), label_key=self.label_key, **opts)
            if self.ctx.enabled and self._parallel is None:
                self._parallel = parallelize(self.student, self.methods, self.teacher, self.ctx, self.device,
                                             self.strategy, AMP[self.amp] if self._sharded else None,
                                             self.shard_teacher, compute=self._step.terms)
                if self._sharded:  # the parameters are DTensors now: the optimizer must hold those
                    self.optimizer = build_optimizer(self._phase_specs["student"][0], self._trainable_parameters())
            # DDP runs the student's forward and the losses inside its wrapper; FSDP shards in place
            self._step.ddp = None if self._sharded else self._parallel
            # eval(): dropout off and BatchNorm statistics frozen, so the teacher's targets are
            # deterministic and its buffers never change.
            self.teacher.eval()
            base = len(self.history) if state is None else 0  # a resumed run returns its whole history

            self._run_phase("student", [self.student, *self.methods], self._trainable_parameters(), self.optimizer,
                            loader, epochs, self._step, self._student_model(), val_loader, state, position,
                            on_epoch_end=lambda epoch, metrics: self.history.append(metrics),
                            indexed=self._step.cache is not None, backward=self._balanced_backward(),
                            on_start=lambda: hook.distillx_on_fit_start(distiller=self),
                            on_epoch_saved=lambda epoch, metrics: hook.distillx_on_epoch_end(
                                distiller=self, epoch=epoch, metrics=metrics))
        finally:
            self.teacher.train(teacher_mode)
            self.student.train(student_mode)
            self._plan.close()
        history = self.history[base:]
        hook.distillx_on_fit_end(distiller=self, metrics=dict(history[-1]) if history else {})
        return history

    def _run_phase(self, name: str, modules: list, params: list, optimizer, loader, epochs: int, losses: Callable,
                   val_model: nn.Module, val_loader, state: Optional[dict], position: Optional[dict],
                   on_epoch_end: Callable, indexed: bool = False, on_start: Optional[Callable] = None,
                   on_epoch_saved: Optional[Callable] = None, backward: Optional[Callable] = None) -> None:
        """The setup both phases share: LR schedule, gradient scaler, the resumed state, the loop.
        ``on_epoch_end`` records the epoch (the history its checkpoint holds); ``on_epoch_saved``
        runs after that checkpoint is written (the plugin hook: if it raises, the epoch is saved)."""
        _, sched, warmup = self._phase_specs[name]
        scheduler = build_scheduler(sched, optimizer, max(1, (steps_per_epoch(loader) or 1) * epochs), warmup)
        scaler = torch.amp.GradScaler("cuda") if self.amp == "fp16" else None
        if state is not None:
            self._teacher_trained |= ckpt.restore(
                state, student=self.student, teacher=self.teacher, methods=self.methods, method_keys=self._keys,
                metrics=self.metrics, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                balancer=self._step.balancer,
                load_sharded=lambda directory, sharded: fsdp.load(directory, sharded, self._sharded_modules(),
                                                                  optimizer))
            self.teacher_history = list(state["history"]["teacher"])
            self.history = list(state["history"]["student"])
            # The saved student already holds the transfer's result: never apply it a second time.
            self._transfer_done |= state["phase"] == "student"
        if on_start is not None:
            on_start()
        autocast = None if name == "student" and self._sharded else AMP[self.amp]  # FSDP2's policy instead
        phase = Phase(name, modules, optimizer, loader, epochs, losses, self.device, scheduler, scaler, autocast,
                      self.grad_clip, self._augment(), self.aug_generator,
                      validator(val_loader, val_model, self.task_loss, self.device, self.label_key), indexed=indexed,
                      params=params, label_key=self.label_key, backward=backward,
                      epoch_metrics=self._step.epoch_metrics if name == "student" else None)
        self._step.epoch_fraction = lambda: phase.epoch_fraction

        sharded = name == "student" and self._sharded

        def build(phase_name, at, shards=None):
            teacher = self.teacher if (self._teacher_trained or phase_name == "teacher") else None
            return ckpt.build(phase_name, at, student=self.student, methods=self.methods, method_keys=self._keys,
                              teacher=teacher, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                              metrics=self.metrics, history={"teacher": self.teacher_history, "student": self.history},
                              transfer_report=self.transfer_report.to_dict() if self.transfer_report else None,
                              sharded=shards, balance=self._balance_state())

        def save(phase_name, at):
            """Called on every rank; rank 0 writes the file (after every rank wrote its shards)."""
            if self.checkpoint_dir is None:
                return None
            path = os.path.join(self.checkpoint_dir, ckpt.FILENAME)
            shards = None
            if sharded:
                shards = fsdp.save(self.checkpoint_dir, f"{fsdp.DCP_DIR}.{phase_name}-{at['epoch']}-{at['step']}",
                                   self._sharded_modules(), optimizer)
            if self.ctx.is_main:
                ckpt.save(build(phase_name, at, shards), path)
                if shards:
                    fsdp.prune(self.checkpoint_dir, keep=shards)
            self.ctx.barrier()
            return path

        if self.checkpoint_dir is not None and self.ctx.is_main:  # a state a checkpoint cannot hold: now, not later
            build(name, {"epoch": 0, "step": 0, "epoch_rng": None, "step_rng": None, "sums": None, "n": 0},
                  fsdp.DCP_DIR if sharded else None)
        generators = ckpt.loader_generators(loader, val_loader) + [self.aug_generator]
        if name == "student" and self._step.generator is not None:
            generators.append(self._step.generator)
        Runner(phase, self.ctx, save, self.metrics, self.progress, on_epoch_end, generators, on_epoch_saved,
               loggers=self.loggers).run(
            position, state["path"] if state is not None else None)

    # -- pieces ----------------------------------------------------------------------------------
    def _check_ranks_agree(self, call: str, train_loader, val_loader, **arguments) -> None:
        """Under several processes, stop every rank (:class:`~distillx.engine.distributed.RanksDisagree`)
        unless all call ``call`` with the same settings: what decides the collectives that follow and
        the result (strategy, methods and their options, epochs, resume, the loaders' lengths, the
        models' parameter shapes, ...). Call it before the phase's first collective."""
        if not self.ctx.enabled:
            return
        optimizer, scheduler, warmup = self._phase_specs["student"]
        t_optimizer, t_scheduler, t_warmup = self._phase_specs["teacher"]
        described = {
            "call": call, **arguments,
            "train_loader": {"batches": steps_per_epoch(train_loader),
                             "batch_size": getattr(train_loader, "batch_size", None)},
            "val_loader": None if val_loader is None else {"batches": steps_per_epoch(val_loader)},
            "strategy": self.strategy, "shard_teacher": self.shard_teacher, "amp": self.amp,
            "grad_clip": self.grad_clip,
            "task_weight": self.task_weight, "task_loss": self.task_loss, "check_finite": self.check_finite,
            "label_key": self.label_key, "student_input": self.student_input,
            "methods": [{"name": method_name(m), "class": type(m), "options": m.config()} for m in self.methods],
            "weight_schedules": self.weight_schedules, "augmentations": [type(a) for a in self.augmentations],
            "cache_teacher": self._cache_opts, "checkpoint_dir": self.checkpoint_dir,
            "balance": None if self._step.balancer is None else self._step.balancer.config(),
            "student": {"optimizer": optimizer, "scheduler": scheduler, "warmup": warmup,
                        "parameters": _shapes(self.student)},
            "teacher": {"optimizer": t_optimizer, "scheduler": t_scheduler, "warmup": t_warmup,
                        "parameters": _shapes(self.teacher)},
        }
        check_same(self.ctx, described, f"Distiller.{call}()'s settings and arguments")

    def _balanced_backward(self) -> Optional[Callable]:
        """The student phase's backward pass under ``balance=`` (None: the loop's plain one)."""
        balancer = self._step.balancer
        if balancer is None:
            return None
        shared = [p for p in self.student.parameters() if p.requires_grad]
        params = self._trainable_parameters()
        step = self._step
        return lambda losses, scaler: balancer.backward(losses, shared, params, scaler, step.term_weights)

    def _balance_state(self) -> Optional[dict]:
        return None if self._step.balancer is None else self._step.balancer.state_dict()

    def _resume_state(self, resume, want_phase: Optional[str], train_loader, val_loader):
        """The checkpoint to resume (or None), after the checks a run that writes or reads
        checkpoints needs: a writable checkpoint_dir, loaders whose random state can be saved."""
        if self.checkpoint_dir is not None or (resume is not None and resume is not False):
            ckpt.check_capturable(train_loader, "train_loader")
            ckpt.check_capturable(val_loader, "val_loader")
        if self.ctx.is_main:
            ckpt.check_directory(self.checkpoint_dir)
        balancer = self._step.balancer
        state = ckpt.for_resume(resume, self.checkpoint_dir, want_phase, self._keys, self.student, self.teacher,
                                self.ctx.world_size, None if balancer is None else balancer.config())
        return state, (state["position"] if state is not None else None)

    def _augment(self):
        if not self.augmentations:
            return None
        augs = self.augmentations
        return lambda inputs, targets, generator: compose(augs, inputs, targets, generator)

    def _move_methods(self) -> None:
        # Adapters live with the student (built lazily, so move them whenever new ones appear).
        for m in self.methods:
            m.to(self.device)

    @property
    def _sharded(self) -> bool:
        """The student phase shards the student with FSDP2 (several processes, ``strategy="fsdp"``)."""
        return self.strategy == "fsdp" and self.ctx.enabled

    def _sharded_modules(self) -> dict[str, nn.Module]:
        """What a sharded checkpoint holds besides the optimizer: the student and the methods with parameters."""
        return {"student": self.student, **{f"method{i}": m for i, m in enumerate(self.methods) if fsdp.has_parameters(m)}}

    def _student_model(self) -> nn.Module:
        """What maps a batch's inputs to the student's outputs: the student, or the teacher trunk + student."""
        return self.composed if self.composed is not None else self.student

    def _pending_setup(self) -> list[Method]:
        return [m for m in self.methods if m.needs_setup]

    def _trainable_parameters(self) -> list[nn.Parameter]:
        params, seen = [], set()
        for p in itertools.chain(self.student.parameters(), *(m.parameters() for m in self.methods)):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params


def _shapes(model: nn.Module) -> str:
    """A short digest of ``model``'s parameter names, shapes and dtypes (equal models, equal digests)."""
    text = ";".join(f"{name}:{tuple(p.shape)}:{p.dtype}" for name, p in model.named_parameters())
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{sum(p.numel() for p in model.parameters())} parameters, shapes {digest}"
