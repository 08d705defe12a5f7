"""Data-parallel training under ``torchrun``: who is rank 0, sharded loaders, reduced metrics.

When ``torch.distributed`` is initialised (``torchrun`` sets the environment; the Distiller calls
:func:`init_from_env` — gloo on CPU, nccl on CUDA — when ``WORLD_SIZE > 1`` and nobody initialised
it yet), the Distiller wraps the student together with the methods' adapters in
``DistributedDataParallel`` (gradients averaged across ranks), leaves the teacher unwrapped and
unsynchronised (it is only read), re-creates each training loader so every rank sees its share of
every global batch (:mod:`distillx.engine.sharding`), sums the epoch metrics over ranks, and lets
only rank 0 write checkpoints, metrics and plots and draw progress bars.

Before its first collective a run checks that every rank runs the same configuration
(:func:`check_same`: a hash of a plain description, gathered; the ranks that differ and the keys
where they differ on every rank). A process group distillx starts has a collective timeout of
``DISTILLX_COLLECTIVE_TIMEOUT`` seconds (default 600): a rank waiting longer for the others in a
collective fails, and :class:`DistContext`'s collectives name the rank and the operation.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import fsdp
from .batches import call_model


TIMEOUT_ENV = "DISTILLX_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT = 600.0


class CollectiveError(RuntimeError):
    """A collective failed on this rank: another rank did not join it within the timeout, or died."""


class RanksDisagree(ValueError):
    """The ranks are not running the same configuration (raised on every rank by :func:`check_same`)."""


def collective_timeout() -> timedelta:
    """The timeout of a process group distillx starts: ``DISTILLX_COLLECTIVE_TIMEOUT`` seconds (default 600)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return timedelta(seconds=DEFAULT_TIMEOUT)
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return timedelta(seconds=value)


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

    def _collective(self, what: str, run: Callable[[], Any]) -> Any:
        # A timeout or a dead peer surfaces as a backend RuntimeError that names neither the rank nor
        # the operation; say both, and what usually causes it.
        try:
            return run()
        except RuntimeError as exc:
            raise CollectiveError(
                f"rank {self.rank} of {self.world_size}: the collective {what} failed: another rank did not join it "
                f"within the process group's timeout ({TIMEOUT_ENV} sets it when distillx starts the group) or "
                f"stopped; look at the other ranks' errors ({type(exc).__name__}: {exc})") from exc

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            self._collective("all_reduce (sum)", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on some rank (every rank gets the same answer)."""
        if not self.enabled:
            return bool(flag)
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        self._collective("all_reduce (any)", lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX))
        return bool(value.item())

    def gather(self, obj):
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        self._collective("all_gather_object", lambda: dist.all_gather_object(out, obj))
        return out

    def mine(self, per_rank: list):
        """This rank's entry of a list gathered by :meth:`gather` (round robin at another world size)."""
        return per_rank[self.rank % len(per_rank)]

    def barrier(self) -> None:
        if self.enabled:
            self._collective("barrier", dist.barrier)

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` overwritten with rank 0's (in place)."""
        if self.enabled:
            self._collective("broadcast", lambda: dist.broadcast(tensor, src=0))
        return tensor


def init_from_env(device: torch.device) -> DistContext:
    """The process group's context, initialising it from ``torchrun``'s environment if needed (with
    :func:`collective_timeout`; a group the caller initialised keeps its own timeout)."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=collective_timeout())
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size())
    return DistContext()


def flatten(value: Any, prefix: str = "") -> dict:
    """A nested description as ``{dotted.key: leaf}`` (dicts by key, lists holding dicts by index)."""
    if isinstance(value, dict):
        out: dict = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    if isinstance(value, list) and value and any(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: value}


def plain(value: Any) -> Any:
    """``value`` as JSON data for :func:`check_same`: containers recursively, numbers, strings, None;
    a function or class by its qualified name and any other object by its type's, never by its repr
    (which holds a memory address that differs between processes)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    named = value if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__") else type(value)
    return f"{getattr(named, '__module__', '?')}.{getattr(named, '__qualname__', type(named).__name__)}"


def check_same(ctx: DistContext, description: dict, what: str, shown: int = 6) -> None:
    """Raise :class:`RanksDisagree` on every rank unless every rank passed the same ``description``
    (of ``what``, for the message: "the run's config").

    ``description`` is turned into JSON data by :func:`plain`. Its hash is gathered (one small
    collective); only when the hashes differ are the flattened descriptions gathered, so the message
    names each rank that differs from rank 0 and up to ``shown`` of the keys where it does, with both
    values. Call it before a run's first collective: ranks that disagree otherwise hang in, or
    corrupt, the collectives that follow.
    """
    if not ctx.enabled:
        return
    text = json.dumps(plain(description), sort_keys=True)
    digests = ctx.gather(hashlib.sha256(text.encode()).hexdigest())
    if len(set(digests)) == 1:
        return
    # Every rank saw the same digests, so every rank takes this second collective.
    flat = ctx.gather({k: json.dumps(v, sort_keys=True) for k, v in flatten(json.loads(text)).items()})
    lines = []
    for rank in range(1, ctx.world_size):
        if digests[rank] == digests[0]:
            continue
        keys = sorted(k for k in set(flat[0]) | set(flat[rank]) if flat[0].get(k) != flat[rank].get(k))
        diffs = [f"{k}: {flat[0].get(k, '(unset)')} on rank 0, {flat[rank].get(k, '(unset)')} on rank {rank}"
                 for k in keys[:shown]]
        more = f"; and {len(keys) - shown} more key(s)" if len(keys) > shown else ""
        lines.append(f"rank {rank} differs from rank 0" + (f" in {'; '.join(diffs)}{more}" if diffs else ""))
    raise RanksDisagree(f"the ranks disagree on {what}, so every rank stops before training: " + " | ".join(lines)
                        + ". Give every rank the same configuration (the same command line, files and arguments)")


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


STRATEGIES = ("ddp", "fsdp")


def parallelize(student: nn.Module, methods, teacher: nn.Module, ctx: DistContext, device: torch.device,
                strategy: str, param_dtype: Optional[torch.dtype] = None, shard_teacher: bool = False,
                compute=None) -> nn.Module:
    """What the step calls for the student's outputs when several processes train:

    - ``"ddp"``: the student and the methods in one DistributedDataParallel (every gradient averaged)
      whose forward is ``compute`` (the step's student forward and loss terms);
    - ``"fsdp"``: the student sharded per block (:func:`distillx.engine.fsdp.shard`) and every method
      layer holding parameters sharded (``param_dtype`` is FSDP2's mixed-precision policy); the teacher
      too when ``shard_teacher``. The optimizer must be built after this (the parameters change).
    """
    if strategy == "ddp":
        return wrap(Trainable(student, methods, compute), ctx, device)
    for m in methods:
        fsdp.shard_leaves(m, param_dtype)
    if shard_teacher:
        fsdp.shard(teacher)
    return fsdp.shard(student, param_dtype)


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
