"""The epoch loop every training phase runs (teacher training, distillation, plain ``train``).

One step: ``(inputs, targets[, indices])`` to the device → augmentations (with their own generator)
→ losses under autocast (``amp``) → ``zero_grad`` → backward (through the ``GradScaler`` for
float16) → optional gradient clipping → optimizer step → LR scheduler step. Per epoch: the
per-sample means of every loss component (summed over ranks), validation, the ``on_epoch_end``
callback (bookkeeping the checkpoint holds), a checkpoint, then the ``on_epoch_saved`` callback (the
plugin hooks: one that raises stops the run with the epoch saved). Step records hold each term, the
total and ``lr`` (the learning rate the step used; ``lr/<i>`` for further parameter groups); they and
the epoch records go to the metrics log and, on rank 0, to the metrics loggers
(:class:`~distillx.loggers.Loggers`, flushed when the phase ends or stops). SIGINT/SIGTERM finish the current step, write a checkpoint of that exact
position and raise :class:`TrainingInterrupted`; resuming from it continues bit for bit (see
:mod:`distillx.engine.checkpoint`). :class:`~distillx.engine.signals.SignalGuard` says when a
further signal stops at once instead.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NoReturn, Optional

import torch

from ..reporting import ProgressBar
from . import checkpoint as ckpt
from .batches import LABELS, batch_size, split, split_indexed, to_device
from .distributed import DistContext
from .sharding import set_epoch
from .signals import SignalGuard

LossFn = Callable[..., dict]
_END = object()  # what next() returns past a loader's last batch


def steps_per_epoch(loader) -> Optional[int]:
    """``len(loader)``, or None for an iterable without a length."""
    try:
        return len(loader)
    except TypeError:
        return None


def running_sums(position: dict, rank: int, world_size: int) -> dict:
    """This process's share ``{"sums", "n"}`` of the interrupted epoch's running sums in a mid-epoch
    position: its own at the world size that saved it; at another, process 0 takes the total of every
    saved process's and the others start from zero, so the epoch's metrics (summed over processes)
    count each saved sample once."""
    saved = position.get("ranks") or [{"sums": position["sums"], "n": position["n"]}]
    if len(saved) == world_size:
        return saved[rank]
    if rank > 0:
        return {"sums": {k: 0.0 for k in saved[0]["sums"]}, "n": 0}
    return {"sums": {k: sum(r["sums"][k] for r in saved) for k in saved[0]["sums"]}, "n": sum(r["n"] for r in saved)}


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint (``.path``) of the exact step."""

    def __init__(self, message: str, path: Optional[str]):
        super().__init__(message)
        self.path = path


@dataclass
class Phase:
    """What one training phase needs; see :class:`Runner`."""

    name: str
    modules: list            # put in train() each epoch (their modes are the caller's to restore)
    optimizer: torch.optim.Optimizer
    loader: Iterable
    epochs: int
    compute_losses: LossFn   # (inputs, targets, indices) -> {"loss": total, component: value, ...}
    device: torch.device
    scheduler: Any = None
    scaler: Any = None       # torch.amp.GradScaler for float16
    amp_dtype: Optional[torch.dtype] = None
    grad_clip: Optional[float] = None
    augment: Optional[Callable] = None        # (inputs, targets, generator) -> (inputs, targets)
    aug_generator: Optional[torch.Generator] = None
    validate: Optional[Callable[[], dict]] = None
    indexed: bool = False    # batches are (indices, inputs, targets) or (indices, mapping)
    label_key: str = LABELS  # the targets of a mapping batch
    params: list = field(default_factory=list)  # for gradient clipping
    backward: Optional[Callable] = None  # (losses, scaler) -> None in place of loss.backward()
    epoch_fraction: float = 0.0  # epoch + step / steps_per_epoch of the step running now (weight schedules)
    epoch_metrics: Optional[Callable[[dict], dict]] = None  # further epoch metrics from the epoch's means


def _unpack(batch, phase: Phase):
    if phase.indexed:
        indices, inputs, targets = split_indexed(batch, phase.label_key)
    else:
        indices, (inputs, targets) = None, split(batch, phase.label_key)
    return indices, to_device(inputs, phase.device), to_device(targets, phase.device)


class Runner:
    """Runs a :class:`Phase` from a position (epoch, step) to its last epoch.

    ``save(position) -> path`` writes a checkpoint for a position dict; ``metrics`` is a
    :class:`distillx.reporting.MetricsLog` (or None); ``progress`` enables the progress bar (None:
    when stderr is a terminal); ``on_epoch_end(epoch, metrics)`` is called on every rank before the
    epoch's checkpoint is written (what it records, the history, is saved), ``on_epoch_saved(epoch,
    metrics)`` after it (user code: if it raises, the epoch is not lost).
    """

    def __init__(self, phase: Phase, ctx: DistContext = DistContext(), save: Optional[Callable] = None,
                 metrics=None, progress: Optional[bool] = False,
                 on_epoch_end: Optional[Callable[[int, dict], None]] = None, extra_generators: Iterable = (),
                 on_epoch_saved: Optional[Callable[[int, dict], None]] = None, loggers=None):
        self.phase, self.ctx, self.save, self.metrics = phase, ctx, save, metrics
        self.loggers = loggers if (loggers and ctx.is_main) else None  # only rank 0 logs
        self.progress = progress if ctx.is_main else False
        self.on_epoch_end, self.on_epoch_saved = on_epoch_end, on_epoch_saved
        self.generators = list(extra_generators)
        self.steps_per_epoch = steps_per_epoch(phase.loader)
        self.last_path: Optional[str] = None

    # -- one step ------------------------------------------------------------------------------
    def _step(self, batch, epoch: int, step: int) -> tuple[dict, int, dict]:
        p = self.phase
        # The rates this step uses (the scheduler moves them after the optimizer step).
        lrs = {("lr" if i == 0 else f"lr/{i}"): float(g["lr"]) for i, g in enumerate(p.optimizer.param_groups)}
        p.epoch_fraction = epoch + step / self.steps_per_epoch if self.steps_per_epoch else float(epoch)
        indices, inputs, targets = _unpack(batch, p)
        if p.augment is not None:
            inputs, targets = p.augment(inputs, targets, p.aug_generator)
        autocast = (torch.autocast(p.device.type, dtype=p.amp_dtype) if p.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            losses = p.compute_losses(inputs, targets, indices)
        p.optimizer.zero_grad(set_to_none=True)
        if p.backward is not None:
            p.backward(losses, p.scaler)
        elif p.scaler is not None:
            p.scaler.scale(losses["loss"]).backward()
        else:
            losses["loss"].backward()
        if p.scaler is not None:
            if p.grad_clip:
                p.scaler.unscale_(p.optimizer)
                torch.nn.utils.clip_grad_norm_(p.params, p.grad_clip)
            p.scaler.step(p.optimizer)
            p.scaler.update()
        else:
            if p.grad_clip:
                torch.nn.utils.clip_grad_norm_(p.params, p.grad_clip)
            p.optimizer.step()
        if p.scheduler is not None:
            p.scheduler.step()
        return losses, batch_size(inputs, targets), lrs

    # -- the loop ------------------------------------------------------------------------------
    def run(self, position: Optional[dict] = None, source: Optional[str] = None) -> list[dict]:
        """Run from ``position`` (a checkpoint's, read from ``source``; None: the start) to the last
        epoch; return the metrics of the epochs run."""
        history: list[dict] = []
        try:
            self._run(position, source, history)
        finally:
            if self.loggers is not None:  # an interrupted or failed phase keeps the curves it had
                self.loggers.flush()
        return history

    def _run(self, position: Optional[dict], source: Optional[str], history: list) -> None:
        p = self.phase
        start_epoch, start_step = (position["epoch"], position["step"]) if position else (0, 0)
        done = 0  # steps run here: the logger's step axis when the loader has no length
        with SignalGuard() as guard:
            if position is not None:
                # Mid-epoch: the loader's shuffle is drawn from the generators' epoch-start state.
                # Also when no epoch is left to run (a checkpoint of the phase's end): whatever runs
                # next (the student phase after the teacher's) starts from the saved state.
                self._set_rng(position["epoch_rng"] if start_step > 0 else position["step_rng"])
            if self.ctx.any(guard.signum is not None):  # caught while the phase was being set up
                self._interrupted(guard, start_epoch, start_step, lambda: dict(position) if position else {
                    "epoch": start_epoch, "step": 0, "epoch_rng": None, "step_rng": self._rng(),
                    "sums": None, "n": 0}, None)
            for epoch in range(start_epoch, p.epochs):
                resuming = position is not None and epoch == start_epoch and start_step > 0
                # Only a checkpoint needs it (a run without checkpoints skips the copy).
                epoch_rng = self._rng() if self.save is not None else None
                for m in p.modules:
                    m.train()
                set_epoch(p.loader, epoch)
                batches = iter(p.loader)
                sums: dict[str, torch.Tensor] = {}
                n, step = 0, 0
                if resuming:
                    self._skip(batches, epoch, start_step, source)
                    self._set_rng(position["step_rng"])
                    epoch_rng = position["epoch_rng"]
                    mine = running_sums(position, self.ctx.rank, self.ctx.world_size)
                    sums = {k: torch.tensor(v, dtype=torch.float64, device=p.device) for k, v in mine["sums"].items()}
                    n, step = mine["n"], start_step
                bar = self._bar(epoch)
                for batch in batches:
                    try:
                        losses, size, lrs = self._step(batch, epoch, step)
                    except FloatingPointError as exc:  # NonFiniteLossError: nothing was stepped
                        if bar is not None:
                            bar.close()
                        kept = (f"; the last checkpoint ({self.last_path}) is kept" if self.last_path
                                else "")
                        raise type(exc)(f"phase {p.name!r}, epoch {epoch}, step {step + 1}: {exc}{kept}") from None
                    values = torch.stack([v.detach().double() for v in losses.values()])
                    for name, v in zip(losses, values * size):
                        sums[name] = sums[name] + v if name in sums else v
                    n += size
                    step += 1
                    done += 1
                    if self.metrics is not None or bar is not None or self.loggers is not None:
                        floats = dict(zip(losses, values.tolist()))
                        if self.metrics is not None and self.ctx.is_main:
                            self.metrics.log_step(p.name, epoch, step, **floats, **lrs)
                        if self.loggers is not None:
                            at = (epoch * self.steps_per_epoch + step if self.steps_per_epoch
                                  else start_step + done)
                            self.loggers.log_step(p.name, at, {**floats, **lrs})
                        if bar is not None:
                            bar.update(size * self.ctx.world_size, **floats)
                    # Every rank stops at the same step (a signal may reach them at different ones).
                    if self.ctx.any(guard.signum is not None):
                        self._interrupted(guard, epoch, step, lambda: self._partial(epoch, step, epoch_rng, sums, n),
                                          bar)
                metrics = self._epoch_metrics(epoch, sums, n)
                if bar is not None:
                    bar.close(**{k: v for k, v in metrics.items() if k.startswith("val_")})
                history.append(metrics)
                if self.metrics is not None and self.ctx.is_main:
                    self.metrics.log_epoch(p.name, epoch, **{k: v for k, v in metrics.items() if k != "epoch"})
                if self.loggers is not None:
                    self.loggers.log_epoch(p.name, epoch, {k: v for k, v in metrics.items() if k != "epoch"})
                if self.on_epoch_end is not None:
                    self.on_epoch_end(epoch, metrics)
                self._save(lambda: {"epoch": epoch + 1, "step": 0, "epoch_rng": None, "step_rng": self._rng(),
                                    "sums": None, "n": 0})
                # After the checkpoint: a hook that raises stops the run, but the epoch it ends is saved.
                if self.on_epoch_saved is not None:
                    self.on_epoch_saved(epoch, metrics)

    def _skip(self, batches, epoch: int, steps: int, source: Optional[str]) -> None:
        """Draw the ``steps`` batches a mid-epoch checkpoint had already trained on; a
        :class:`~distillx.engine.checkpoint.CheckpointError` when this run's loader has fewer."""
        if self.steps_per_epoch is not None and steps > self.steps_per_epoch:
            self._unreachable(source, epoch, steps, f"has {self.steps_per_epoch} steps per epoch")
        for done in range(steps):
            if next(batches, _END) is _END:  # a loader without len() tells only now
                self._unreachable(source, epoch, steps, f"yields only {done} batches per epoch")

    @staticmethod
    def _unreachable(source: Optional[str], epoch: int, step: int, have: str) -> NoReturn:
        where = f"checkpoint {source!r}" if source else "the checkpoint"
        raise ckpt.CheckpointError(
            f"{where} was saved at step {step} of epoch {epoch}, but this run's train_loader {have} (a different batch "
            "size or dataset, or another number of processes?): the saved position does not exist in this run; resume "
            "with the loader the checkpoint was written with")

    def _interrupted(self, guard: SignalGuard, epoch: int, step: int, position: Callable[[], dict], bar) -> None:
        """Write a checkpoint of ``position()`` and raise :class:`TrainingInterrupted`."""
        if bar is not None:
            bar.close()
        path = self._save(position)
        raise TrainingInterrupted(
            f"training interrupted by signal {guard.signum or 'on another rank'} in phase {self.phase.name!r} at epoch {epoch}, step {step}"
            + (f"; checkpoint written to {path}" if path else " (no checkpoint_dir: nothing was saved)"), path)

    def _epoch_metrics(self, epoch: int, sums: dict, n: int) -> dict:
        p = self.phase
        names = list(sums)
        packed = torch.stack([sums[k] for k in names] + [torch.tensor(float(n), dtype=torch.float64, device=p.device)])
        packed = self.ctx.all_reduce_sum(packed)
        total = float(packed[-1])
        if total == 0:
            raise ValueError("train_loader is empty: it yields no batches")
        metrics: dict[str, Any] = {"epoch": epoch}
        metrics.update({k: float(v) / total for k, v in zip(names, packed[:-1])})
        if p.epoch_metrics is not None:
            metrics.update(p.epoch_metrics(metrics))
        if p.validate is not None:
            metrics.update({f"val_{k}": v for k, v in p.validate().items()})
        return metrics

    def _partial(self, epoch: int, step: int, epoch_rng, sums: dict, n: int) -> dict:
        """A mid-epoch position: the epoch's running sums are each rank's own (``ranks`` under several
        processes; ``sums``/``n`` are this rank's). A collective, like :meth:`_rng`."""
        own = {"sums": {k: float(v) for k, v in sums.items()}, "n": n}
        position = {"epoch": epoch, "step": step, "epoch_rng": epoch_rng, "step_rng": self._rng(), **own}
        if self.ctx.enabled:
            position["ranks"] = self.ctx.gather(own)
        return position

    def _rng(self) -> dict:
        """Every generator's state; under several processes every rank's (``{"ranks": [...]}``, a
        collective: all ranks call it at the same point)."""
        state = ckpt.rng_state(self.generators)
        return {"ranks": self.ctx.gather(state)} if self.ctx.enabled else state

    def _set_rng(self, state: dict) -> None:
        ckpt.set_rng_state(self.ctx.mine(state["ranks"]) if "ranks" in state else state, self.generators,
                           ckpt.CheckpointError)

    def _save(self, position: Callable[[], dict]) -> Optional[str]:
        """Write a checkpoint of ``position()`` (built only when something is written). Every rank
        calls it at the same points: ``position()`` gathers the ranks' random states, and ``save``
        writes on rank 0 (or collectively, for sharded models); it returns the path on every rank."""
        if self.save is None:
            return None
        self.last_path = self.save(self.phase.name, position())
        return self.last_path

    def _bar(self, epoch: int):
        if self.progress is False:
            return None
        return ProgressBar(self.steps_per_epoch, f"{self.phase.name} epoch {epoch + 1}/{self.phase.epochs}",
                           enabled=self.progress)
