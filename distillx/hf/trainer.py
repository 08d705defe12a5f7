"""``distillx.hf.DistillationTrainer``: distillx's methods inside ``transformers.Trainer``.

    from distillx.hf import DistillationTrainer
    trainer = DistillationTrainer(model=student, args=TrainingArguments("runs/t", ...), train_dataset=ds,
                                  data_collator=collator, teacher=teacher,
                                  methods=[dx.method("lm_kd", T=2.0)], task_weight=0.0)
    trainer.train()                                   # or resume_from_checkpoint=True

The step is the Distiller's: a :class:`distillx.Distiller` is built on the same pair (never fitted)
and its :class:`~distillx.engine.step.DistillStep` computes the loss, so feature hooks, adapters,
``lm_kd`` without logits, weights and the non-finite check are the same code (``loss`` at a step
equals ``Distiller.losses(batch)``). Everything else is the Trainer's: arguments, data, collators,
callbacks, ``accelerate launch``/``torchrun``, checkpoints and logging.

This module sits at the apps layer (it builds a Distiller) although it lives under ``distillx.hf``;
``distillx.hf`` re-exports the class lazily (docs/architecture.md). ``transformers`` is imported when
the class is first used.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from ..distiller import Distiller
from ..engine.batches import LABELS

__all__ = ["DistillationTrainer", "METHODS_FILE"]

METHODS_FILE = "distillx_methods.pt"  # the methods' state (adapters) next to a checkpoint's weights
# Distiller arguments the Trainer has no use for, each with the reason (the Trainer's own way).
NOT_HERE = {
    "balance": "loss balancing runs its own backward passes; use distillx.Distiller(balance='auto')",
    "balance_primary": "loss balancing is not supported here; use distillx.Distiller",
    "balance_every": "loss balancing is not supported here; use distillx.Distiller",
    "optimizer": "pass TrainingArguments(optim=..., learning_rate=...) or Trainer(optimizers=...)",
    "scheduler": "pass TrainingArguments(lr_scheduler_type=..., warmup_steps=...)",
    "amp": "pass TrainingArguments(bf16=True) or fp16=True",
    "checkpoint_dir": "checkpoints are the Trainer's: TrainingArguments(output_dir=..., save_steps=...)",
    "loggers": "the Trainer logs through TrainingArguments(report_to=[...])",
    "cache_teacher": "the teacher cache is a distillx.Distiller feature",
    "augmentations": "augment in the dataset or the collator",
    "student_input": "a student on the teacher's features needs distillx.Distiller",
    "strategy": "distribution is accelerate's: accelerate launch / torchrun",
    "teacher_epochs": "train the teacher beforehand (a Trainer of its own)",
}


def _trainer_class():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("distillx.hf.DistillationTrainer needs transformers: pip install 'distillx[hf]' "
                          f"({exc})") from None
    return transformers.Trainer


def __getattr__(name: str):
    if name == "DistillationTrainer":
        cls = _build()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build():
    Trainer = _trainer_class()
    import transformers

    class DistillationTrainer(Trainer):
        """``transformers.Trainer`` whose loss is distillx's distillation step.

        Args (besides every ``Trainer`` argument, ``model`` being the student):
            teacher: the teacher; moved to ``args.device``, kept in ``eval()`` for every step, run
                under ``no_grad``, never in the optimizer nor in the checkpoints.
            methods: distillx methods (``[dx.method("kd", T=2.0)]``); generic: any registered method.
            task_weight: weight of the task loss (the student's cross-entropy, next-token loss for a
                causal LM; 0 for pure distillation); ``task_loss`` replaces it.
            transfer: a weight transfer applied to the student when :meth:`train` starts from
                scratch (not when it resumes: the checkpoint holds the result).
            example_inputs: a batch's inputs to build shape-dependent adapters (``sld``) now;
                default: the first training batch, drawn without touching the global RNG.
            label_key: the targets' key in batches (default ``"labels"``).

        Adapters (a method's parameters) join the optimizer as a parameter group of their own
        (``args.weight_decay``, the same schedule); their state is saved as ``distillx_methods.pt``
        in every checkpoint and loaded on ``train(resume_from_checkpoint=...)``. Each term is
        logged through the Trainer's logging as ``loss/<term>`` (the mean since the last log).
        Under several processes, methods with parameters are refused (their gradients would not be
        averaged over ranks): use :class:`distillx.Distiller` with ``strategy="ddp"`` for those.
        ``balance=`` and the Distiller's other loop options are refused by name, with the
        Trainer's way of doing the same.
        """

        def __init__(self, model: nn.Module = None, args: Any = None, *, teacher: nn.Module = None,
                     methods=(), task_weight: float = 1.0, task_loss=None, transfer=None, example_inputs=None,
                     label_key: str = LABELS, check_finite: bool = True, **kwargs):
            refused = sorted(set(kwargs) & set(NOT_HERE))
            if refused:
                raise TypeError(f"DistillationTrainer does not take {refused[0]}=: {NOT_HERE[refused[0]]}")
            if teacher is None:
                raise TypeError("DistillationTrainer needs teacher= (a torch.nn.Module)")
            if model is None:
                raise TypeError("DistillationTrainer needs model= (the student, a torch.nn.Module)")
            super().__init__(model=model, args=args, **kwargs)
            # The step's loss is a per-batch mean: the Trainer divides it by the accumulation steps.
            self.loss_is_scaled_for_ga = False
            self.distiller = Distiller(teacher, self.model, methods, task_loss=task_loss, task_weight=task_weight,
                                       device=self.args.device, example_inputs=example_inputs,
                                       check_finite=check_finite, transfer=transfer, progress=False,
                                       label_key=label_key)
            self.teacher = self.distiller.teacher.eval()
            if self.args.world_size > 1 and self._method_parameters():
                self.distiller.close()
                raise ValueError("DistillationTrainer under several processes with methods that hold parameters "
                                 "(adapters) is not supported: their gradients would not be averaged over the ranks; "
                                 "use distillx.Distiller(strategy='ddp') or methods without adapters")
            self._terms: dict[str, list] = {}
            # The Trainer zeroes only the model's gradients after an optimizer step: the adapters' would
            # accumulate over every step (they are not in model.parameters()).
            self.add_callback(_ZeroMethodGradients(self._method_parameters))

        # -- the step ----------------------------------------------------------------------------
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            d = self.distiller
            self.teacher.eval()  # the Trainer puts only the student in train()
            step = d._step
            plain = step.student
            step.student = model  # the Trainer's (possibly DDP-wrapped) student: gradients sync through it
            try:
                losses = d.losses(dict(inputs))
            finally:
                step.student = plain
            loss = losses["loss"]
            if model.training:
                for key, value in losses.items():
                    if key != "loss":
                        self._terms.setdefault(key, []).append(value.detach())
            if return_outputs:
                logits = step._outs[0] if step._outs is not None else None
                return loss, ({"logits": logits} if logits is not None else {})
            return loss

        def log(self, logs, *args, **kwargs):
            if self._terms and "loss" in logs:  # a training log: add each term's mean since the last one
                for key, values in self._terms.items():
                    logs[f"loss/{key}"] = torch.stack(values).float().mean().item()
                self._terms = {}
            return super().log(logs, *args, **kwargs)

        # -- adapters: built before the optimizer, in it, in the checkpoints -----------------------
        def _method_parameters(self) -> list:
            seen, params = set(), []
            for m in self.distiller.methods:
                for p in m.parameters():
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
            return params

        def _setup_methods(self) -> None:
            d = self.distiller
            if d._pending_setup() and d.optimizer is None:
                with torch.random.fork_rng(devices=[]):  # drawing a batch must not move the training RNG
                    batch = next(iter(self.get_train_dataloader()), None)
                if batch is None:
                    raise ValueError("train_dataset is empty: the adapters need one batch to be built")
                inputs = {k: v for k, v in batch.items() if k != d.label_key} if isinstance(batch, Mapping) else batch
                d.setup(inputs)

        def create_optimizer(self, *args, **kwargs):
            self._setup_methods()
            optimizer = super().create_optimizer(*args, **kwargs)
            held = {id(p) for g in optimizer.param_groups for p in g["params"]}
            extra = [p for p in self._method_parameters() if id(p) not in held]
            if extra:
                optimizer.add_param_group({"params": extra, "weight_decay": self.args.weight_decay})
            return optimizer

        def train(self, resume_from_checkpoint=None, *args, **kwargs):
            if resume_from_checkpoint is None or resume_from_checkpoint is False:
                self.distiller.apply_transfer()
            else:  # the checkpoint's student already holds the transfer's result
                self.distiller._transfer_done = True
            try:
                return super().train(resume_from_checkpoint, *args, **kwargs)
            finally:
                self.distiller._plan.attach()

        def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
            super()._save(output_dir, state_dict)
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            states = [m.state_dict() for m in self.distiller.methods]
            if self.args.should_save and any(states):
                torch.save(states, os.path.join(output_dir, METHODS_FILE))

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            path = os.path.join(resume_from_checkpoint, METHODS_FILE)
            if not os.path.isfile(path):
                # Built first: an adapter that turns out to hold nothing (sld between equal widths)
                # wrote no file and needs none.
                self._setup_methods()
                if any(m.state_dict() for m in self.distiller.methods):
                    raise FileNotFoundError(f"checkpoint {resume_from_checkpoint!r} has no {METHODS_FILE}: the "
                                            "methods' adapters cannot be restored (a checkpoint of another run?)")
                return
            self._setup_methods()
            states = torch.load(path, weights_only=True, map_location=self.args.device)
            if len(states) != len(self.distiller.methods):
                raise ValueError(f"{path} holds {len(states)} method states, this trainer has "
                                 f"{len(self.distiller.methods)} methods")
            for m, s in zip(self.distiller.methods, states):
                m.load_state_dict(s)

    class _ZeroMethodGradients(transformers.TrainerCallback):
        def __init__(self, parameters):
            self.parameters = parameters

        def on_step_end(self, args, state, control, **kwargs):
            for p in self.parameters():
                p.grad = None

        DistillationTrainer.__module__ = __name__
    DistillationTrainer.__qualname__ = "DistillationTrainer"
    return DistillationTrainer
