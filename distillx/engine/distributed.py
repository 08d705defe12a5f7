"""Data-parallel training under ``torchrun``: who is rank 0, sharded loaders, reduced metrics.

When ``torch.distributed`` is initialised (``torchrun`` sets the environment; the Distiller calls
:func:`init_from_env` — gloo on CPU, nccl on CUDA — when ``WORLD_SIZE > 1`` and nobody initialised
it yet), the Distiller wraps the student together with the methods' adapters in
``DistributedDataParallel`` (gradients averaged across ranks), leaves the teacher unwrapped and
unsynchronised (it is only read), re-creates each training loader so every rank sees its share of
every global batch (:mod:`distillx.engine.sharding`), sums the epoch metrics over ranks, and lets
only rank 0 write checkpoints, metrics and plots and draw progress bars.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


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

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` overwritten with rank 0's (in place)."""
        if self.enabled:
            dist.broadcast(tensor, src=0)
        return tensor


def init_from_env(device: torch.device) -> DistContext:
    """The process group's context, initialising it from ``torchrun``'s environment if needed."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    return DistContext()


class Trainable(nn.Module):
    """The student and the methods (their adapters) as one module, so DDP averages every gradient."""

    def __init__(self, student: nn.Module, methods):
        super().__init__()
        self.student = student
        self.methods = nn.ModuleList(methods)

    def forward(self, inputs):
        return self.student(inputs)


def wrap(module: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel when ``ctx`` has several ranks (on ``device``), else itself."""
    if not ctx.enabled:
        return module
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index if device.index is not None else torch.cuda.current_device()]
    return nn.parallel.DistributedDataParallel(module, **kwargs)
