"""Data-parallel training under ``torchrun``: who is rank 0, sharded loaders, reduced metrics.

When ``torch.distributed`` is initialised (``torchrun`` sets the environment; the Distiller calls
:func:`init_from_env` — gloo on CPU, nccl on CUDA — when ``WORLD_SIZE > 1`` and nobody initialised
it yet), the Distiller wraps the student together with the methods' adapters in
``DistributedDataParallel`` (gradients averaged across ranks), leaves the teacher unwrapped and
unsynchronised (it is only read), re-creates each training loader with a ``DistributedSampler``
(every rank sees its shard of every global batch), sums the epoch metrics over ranks, and lets only
rank 0 write checkpoints, metrics and plots and draw progress bars.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .batches import call_model


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_from_env(device: torch.device) -> DistContext:
    """The process group's context, initialising it from ``torchrun``'s environment if needed."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    return DistContext()


class Trainable(nn.Module):
    """The student and the methods (their adapters) as one module, so DDP averages every gradient.

    Its forward is ``compute(*args)`` (the step's student forward and loss terms): DDP's output is
    then the losses themselves, and it finds the parameters they do not reach (``find_unused_parameters``).
    """

    def __init__(self, student: nn.Module, methods, compute=None):
        super().__init__()
        self.student = student
        self.methods = nn.ModuleList(methods)
        self.compute = compute

    def forward(self, *args):
        if self.compute is None:
            return call_model(self.student, args[0], "student")
        return self.compute(*args)


def wrap(module: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel when ``ctx`` has several ranks (on ``device``), else itself."""
    if not ctx.enabled:
        return module
    # The wrapped forward returns the losses (Trainable), so parameters they never reach (a BERT pooler,
    # the layers above the last distilled one) are found and skipped by the gradient reduction.
    kwargs = {"find_unused_parameters": isinstance(module, Trainable) and module.compute is not None}
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index if device.index is not None else torch.cuda.current_device()]
    return nn.parallel.DistributedDataParallel(module, **kwargs)


def shard_loader(loader, ctx: DistContext, shuffle: Optional[bool] = None, seed: int = 0):
    """``loader`` re-created over a ``DistributedSampler`` for this rank (same batch size per rank).

    The global batch is ``world_size × batch_size``. ``shuffle`` defaults to whether ``loader``
    shuffles (a ``RandomSampler``). Non-DataLoader iterables cannot be sharded: an error says so.
    """
    if not ctx.enabled:
        return loader
    from torch.utils.data import DataLoader, RandomSampler
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(loader, DataLoader):
        raise TypeError(f"distributed training needs torch.utils.data.DataLoader loaders to shard, got "
                        f"{type(loader).__name__}")
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    if shuffle is None:
        shuffle = isinstance(loader.sampler, RandomSampler)
    sampler = DistributedSampler(loader.dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle,
                                 seed=seed, drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn)


def set_epoch(loader, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
