"""Every form of DataLoader split across ranks, keeping its sampler, its shuffle and its batch size.

:func:`shard_loader` rebuilds a loader so that each rank iterates its share of every epoch:

- ``batch_size=N`` with any sampler (``RandomSampler``, ``SequentialSampler``, a custom one): the
  rank takes every ``world``-th index of the *original* sampler's epoch order, so batches of N per
  rank (a global batch of ``world × N``);
- ``batch_sampler=`` (custom batching) and a ``BatchSampler`` passed as ``sampler=`` with
  ``batch_size=None``: the rank takes every ``world``-th batch, each of its original size;
- map-style datasets of any item type (tuples, mappings) with the loader's own collate function.

The order comes from the loader's sampler on every rank, so it must be the same on every rank. A
sampler drawing from its own ``torch.Generator`` gets rank 0's generator state at sharding time
(every epoch then draws the same permutation on every rank, and the generator is what a checkpoint
saves and restores, exactly). A ``RandomSampler`` without a generator (the global RNG) is given one,
seeded from rank 0. An epoch that does not divide evenly is padded, like ``DistributedSampler``,
by repeating its first items (or batches), so every rank runs the same number of steps;
``drop_last=True`` loaders drop the tail instead.

Refused, with an error naming the type: iterables that are not DataLoaders and ``IterableDataset``
loaders (no indices to split: shard the stream per rank yourself, see the error), and samplers that
draw randomness from anything but a ``torch.Generator`` distillx can see (their order would differ
between ranks).
"""
from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from .distributed import DistContext
from .rng import foreign_rng

_KNOWN = (RandomSampler, SequentialSampler, BatchSampler, DistributedSampler)


class ShardedSampler(Sampler):
    """Every ``world``-th item of ``sampler``'s epoch, starting at ``rank``, padded to equal length.

    Items are whatever ``sampler`` yields: indices, or index lists of a batch sampler.
    ``set_epoch`` is passed on to ``sampler`` when it has one.
    """

    def __init__(self, sampler: Any, rank: int, world_size: int, drop_last: bool = False):
        self.sampler, self.rank, self.world_size, self.drop_last = sampler, rank, world_size, drop_last

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.world_size if self.drop_last else math.ceil(n / self.world_size)

    def __iter__(self) -> Iterator:
        items = list(self.sampler)
        per_rank = len(self) if items else 0
        total = per_rank * self.world_size
        if total > len(items):  # pad by cycling from the start, so every rank runs the same steps
            items += list(itertools.islice(itertools.cycle(items), total - len(items)))
        return iter(items[self.rank:total:self.world_size])

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def _generator_of(sampler: Any) -> Optional[torch.Generator]:
    g = getattr(sampler, "generator", None)
    return g if isinstance(g, torch.Generator) else None


def _same_generator_everywhere(g: torch.Generator, ctx: DistContext) -> None:
    """Give ``g`` rank 0's state on every rank."""
    state = g.get_state()
    ctx.broadcast_(state)
    g.set_state(state)


def _prepare(sampler: Any, ctx: DistContext, seed_generator) -> Any:
    """``sampler`` with an order that is the same on every rank (checked down a batch sampler). A
    global-RNG RandomSampler is copied (the user's loader keeps its own) and given a generator."""
    inner = sampler.sampler if isinstance(sampler, BatchSampler) else sampler
    g = _generator_of(inner)
    if isinstance(inner, RandomSampler) and g is None:
        inner = copy.copy(inner)
        inner.generator = g = seed_generator()
        if isinstance(sampler, BatchSampler):
            sampler = copy.copy(sampler)
            sampler.sampler = inner
        else:
            sampler = inner
    if g is not None:
        _same_generator_everywhere(g, ctx)
    elif not isinstance(inner, _KNOWN) and any(foreign_rng(v) for v in getattr(inner, "__dict__", {}).values()):
        raise TypeError(f"cannot shard a loader whose sampler {type(inner).__name__} draws random numbers distillx "
                        "cannot make equal on every rank; give it a torch.Generator attribute named 'generator' "
                        "(seeded the same on every rank), or pass a DistributedSampler yourself")
    return sampler


def shard_loader(loader: Any, ctx: DistContext, seed: int = 0) -> Any:
    """``loader`` rebuilt to iterate this rank's share (see the module docstring); itself with one process
    or when it already uses a ``DistributedSampler``."""
    if not ctx.enabled:
        return loader
    if not isinstance(loader, DataLoader):
        raise TypeError(f"distributed training needs a torch.utils.data.DataLoader to shard, got "
                        f"{type(loader).__name__}: wrap the data in a map-style Dataset and a DataLoader")
    if isinstance(loader.dataset, IterableDataset):
        raise TypeError(f"cannot shard a loader over the IterableDataset {type(loader.dataset).__name__}: it has no "
                        "indices to split between ranks. Use a map-style dataset, or split the stream per rank "
                        "yourself (torch.distributed.get_rank(), get_world_size()) and pass a map-style view")
    if isinstance(loader.sampler, (DistributedSampler, ShardedSampler)) or \
            isinstance(getattr(loader.batch_sampler, "sampler", None), (DistributedSampler, ShardedSampler)):
        return loader

    def seed_generator() -> torch.Generator:
        chosen = torch.tensor([seed if seed else int(torch.randint(0, 2**62, ()).item())], dtype=torch.int64)
        ctx.broadcast_(chosen)
        return torch.Generator().manual_seed(int(chosen))

    opts = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)
    if loader.batch_size is not None:  # the usual form: BatchSampler(sampler, batch_size, drop_last)
        sampler = ShardedSampler(_prepare(loader.sampler, ctx, seed_generator), ctx.rank, ctx.world_size,
                                 loader.drop_last)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last,
                          **opts)
    if loader.batch_sampler is not None:  # batch_sampler=: whole batches per rank
        batches = ShardedSampler(_prepare(loader.batch_sampler, ctx, seed_generator), ctx.rank, ctx.world_size)
        return DataLoader(loader.dataset, batch_sampler=batches, **opts)
    # batch_size=None: each item of the sampler is one model batch (a BatchSampler as sampler=, or samples)
    sampler = ShardedSampler(_prepare(loader.sampler, ctx, seed_generator), ctx.rank, ctx.world_size)
    return DataLoader(loader.dataset, batch_size=None, sampler=sampler, **opts)


def set_epoch(loader: Any, epoch: int) -> None:
    """``set_epoch`` on the loader's sampler (or batch sampler) when it has one."""
    for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


__all__ = ["ShardedSampler", "shard_loader", "set_epoch"]
