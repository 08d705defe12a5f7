"""Plain supervised training and evaluation on the engine's loop, and the optimizer/device helpers
the Distiller shares.

:func:`run_epochs` owns the loop (device transfer, zero_grad/backward/step, per-epoch averages,
validation); callers only say how a batch turns into losses. :func:`train` uses it with the task
loss alone (a teacher, or a student trained from scratch); :class:`distillx.Distiller` uses it with
the task loss plus weighted distillation losses. Keeping one loop means both runs differ only in
their loss, which is what a fair scratch-vs-distilled comparison needs.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

from .. import _checks
from .batches import LABELS, call_model, check_loader, correct_and_counted, logits_of, task_cross_entropy, unpack_batch
from .loop import Phase, Runner

# (inputs, targets) -> {"loss": total to backpropagate, other names: components for logging}
LossFn = Callable[[torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]]
OptimizerSpec = Union[None, torch.optim.Optimizer, Callable[[list], torch.optim.Optimizer]]

DEFAULT_LR = 1e-3


def resolve_device(model: nn.Module, device: Union[None, str, torch.device]) -> torch.device:
    """``device`` if given, else the device of the model's first parameter (CPU for a parameterless model)."""
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def build_optimizer(optimizer: OptimizerSpec, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Turn an optimizer spec into an optimizer over ``params``.

    ``None`` gives ``AdamW(lr=1e-3)``; a callable is a factory called with the parameter list; an
    existing optimizer is used as is, but must already hold every parameter in ``params``
    (otherwise, e.g., a method's adapter would silently never train).
    """
    if optimizer is None:
        return torch.optim.AdamW(params, lr=DEFAULT_LR)
    if isinstance(optimizer, torch.optim.Optimizer):
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = sum(1 for p in params if id(p) not in held)
        if missing:
            raise ValueError(f"optimizer does not hold {missing} of the {len(params)} trainable parameters "
                             "(student and method parameters); pass a factory such as "
                             "`lambda params: torch.optim.SGD(params, lr=0.1)` instead")
        return optimizer
    if callable(optimizer):
        built = optimizer(params)
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory must return a torch.optim.Optimizer, got {type(built).__name__}")
        return built
    raise TypeError(f"optimizer must be None, a torch.optim.Optimizer or a factory params -> Optimizer, "
                    f"got {type(optimizer).__name__}")


def check_epochs(epochs: Any) -> int:
    """Return ``epochs`` if it is an int >= 1 (bools excluded), else raise ``ValueError``."""
    return _checks.integer("epochs", epochs, ge=1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, loss_fn: Optional[Callable] = None,
             device: Union[None, str, torch.device] = None, label_key: str = LABELS) -> dict[str, Optional[float]]:
    """Accuracy (fraction of argmax hits) and mean ``loss_fn`` (default cross-entropy, ``-100``
    ignored) of ``model`` on ``loader``, both over the labelled targets only.

    Batches are ``(inputs, targets)`` pairs or mappings with targets under ``label_key``. Token
    targets (B, L) count per token, ``-100`` ones not at all; a ``loss_fn`` marked ``next_token``
    (:func:`~distillx.engine.batches.causal_lm_loss`) shifts the accuracy by one position. The model
    runs in ``eval()`` mode; its previous mode is restored afterwards. The loss is averaged per
    labelled target: each batch's loss is weighted by its number of labelled targets (soft targets:
    its rows), so a short last batch is not over-weighted and a batch without a labelled target
    adds nothing. A loader with no labelled target at all gives ``{"accuracy": None, "loss": None}``:
    there is nothing to measure (not NaN, and not an error: a validation set may hold no labels).
    """
    check_loader(loader, "loader")
    loss_fn = task_cross_entropy if loss_fn is None else loss_fn
    next_token = bool(getattr(loss_fn, "next_token", False))
    device = resolve_device(model, device)
    was_training = model.training
    model.eval()
    try:
        correct = torch.zeros((), dtype=torch.int64, device=device)
        counted = torch.zeros((), dtype=torch.int64, device=device)
        weights = torch.zeros((), dtype=torch.int64, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        batches = 0
        for batch in loader:
            inputs, targets = unpack_batch(batch, device, label_key)
            if targets is None:
                raise ValueError(f"evaluation needs targets, but a mapping batch of the loader has no {label_key!r} "
                                 f"entry (its keys: {sorted(map(str, inputs))})")
            logits = logits_of(call_model(model, inputs), "model")
            # Sums stay on the device: one host sync per evaluation, not one per batch.
            hits, count = correct_and_counted(logits, targets, next_token)
            correct += hits
            counted += count
            weight = count.new_tensor(len(targets)) if targets.is_floating_point() else count
            # A batch without a labelled target has weight 0: its loss (0 by distillx's rule, or
            # whatever a custom loss_fn returns there, NaN included) must not reach the sum.
            loss_sum += torch.where(weight > 0, loss_fn(logits, targets).double() * weight, 0.0)
            weights += weight
            batches += 1
    finally:
        model.train(was_training)
    if batches == 0:
        raise ValueError("loader is empty: it yields no batches")
    total, weight = counted.item(), weights.item()
    return {"accuracy": correct.item() / total if total else None,
            "loss": loss_sum.item() / weight if weight else None}


def validator(val_loader: Optional[Iterable], model: nn.Module, loss_fn: Optional[Callable],
              device: torch.device, label_key: str = LABELS) -> Optional[Callable[[], dict]]:
    """``() -> evaluate(model, val_loader, ...)`` after checking ``val_loader``, or None without one."""
    if val_loader is None:
        return None
    check_loader(val_loader, "val_loader")
    return lambda: evaluate(model, val_loader, loss_fn, device, label_key)


def run_epochs(model: nn.Module, loader: Iterable, epochs: int, compute_losses: LossFn,
               optimizer: torch.optim.Optimizer, device: torch.device, val_loader: Optional[Iterable] = None,
               val_loss_fn: Optional[Callable] = None,
               on_epoch_end: Optional[Callable[[int, dict], None]] = None) -> list[dict[str, float]]:
    """Train ``model`` for ``epochs`` passes over ``loader``; return one metrics dict per epoch.

    Each dict has ``epoch`` (0-based, like the ``distillx_on_epoch_end`` hook), the per-sample mean
    of every entry returned by ``compute_losses`` (``loss`` is the total that was backpropagated),
    and ``val_accuracy``/``val_loss`` when ``val_loader`` is given (None when it has no labelled
    target, as :func:`evaluate` says). ``model`` is put in train mode
    for each epoch; evaluation restores it. This is the engine's loop (:mod:`distillx.engine.loop`)
    without schedules, checkpoints or augmentation, the one the Distiller runs with them.
    """
    epochs = check_epochs(epochs)
    check_loader(loader, "train_loader")
    phase = Phase("train", [model], optimizer, loader, epochs, lambda inputs, targets, _: compute_losses(inputs, targets),
                  device, validate=validator(val_loader, model, val_loss_fn, device))
    return Runner(phase, on_epoch_end=on_epoch_end).run()


def train(model: nn.Module, loader: Iterable, epochs: int, optimizer: OptimizerSpec = None,
          loss_fn: Optional[Callable] = None, device: Union[None, str, torch.device] = None,
          val_loader: Optional[Iterable] = None) -> list[dict[str, float]]:
    """Plain supervised training of ``model`` with ``loss_fn`` (default cross-entropy).

    Same loop as :meth:`distillx.Distiller.fit` without a teacher: use it for the teacher phase and
    for a from-scratch baseline. ``optimizer`` is as in :func:`build_optimizer`. The model is moved
    to ``device`` (default: where its parameters are). Returns per-epoch metrics
    (``epoch``, ``loss``, and ``val_accuracy``/``val_loss`` with ``val_loader``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    loss_fn = task_cross_entropy if loss_fn is None else loss_fn
    device = resolve_device(model, device)
    model.to(device)
    opt = build_optimizer(optimizer, [p for p in model.parameters()])

    def compute_losses(inputs, targets):
        if targets is None:
            raise ValueError("train() needs targets: a mapping batch has no 'labels' entry")
        return {"loss": loss_fn(logits_of(call_model(model, inputs), "model"), targets)}

    was_training = model.training
    try:
        return run_epochs(model, loader, epochs, compute_losses, opt, device, val_loader, loss_fn)
    finally:
        model.train(was_training)
