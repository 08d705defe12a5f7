"""Sample identity for the teacher cache: datasets and loaders that also yield each sample's index."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate, default_convert

from .. import _checks


class _IndexedSample(tuple):
    """``(i, *item)`` that remembers the original ``item``, so the collate function sees it unchanged."""

    def __new__(cls, index: int, item: Any):
        self = super().__new__(cls, (index, *item) if isinstance(item, (tuple, list)) else (index, item))
        self.item = item
        return self

    def __reduce__(self):
        return _IndexedSample, (self[0], self.item)


class IndexedDataset(Dataset):
    """A map-style dataset whose item ``i`` is ``(i, *dataset[i])`` (``(i, dataset[i])`` when the
    item is not a tuple/list): with ``(inputs, targets)`` items, ``(index, inputs, targets)``."""

    def __init__(self, dataset: Dataset):
        _check_map_style(dataset, "dataset")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index) -> tuple:
        # A list of indices when a BatchSampler is the loader's sampler (batch_size=None): one batch.
        key = [int(i) for i in index] if isinstance(index, (list, tuple)) else int(index)
        return _IndexedSample(key, self.dataset[index])

    def __getitems__(self, indices: Sequence[int]) -> list:
        # DataLoader fetches a whole batch through __getitems__ when the dataset has one (Subset,
        # Hugging Face datasets): keep that fast path.
        inner = getattr(self.dataset, "__getitems__", None)
        items = inner(list(indices)) if inner else None
        if not isinstance(items, list) or len(items) != len(indices):
            items = [self.dataset[i] for i in indices]
        return [_IndexedSample(int(i), item) for i, item in zip(indices, items)]

    def __repr__(self) -> str:
        return f"IndexedDataset({self.dataset!r})"


class _IndexedCollate:
    """Collate ``(i, *item)`` samples into ``(indices, *collate_fn(items))``.

    The wrapped ``collate_fn`` receives the original items, so a custom collate written for the
    plain loader works unchanged; a result that is not a tuple/list comes out as ``(indices, result)``.
    A top-level class (not a closure) so worker processes can pickle it.
    """

    def __init__(self, collate_fn: Callable, batched: bool = True):
        self.collate_fn = collate_fn
        self.batched = batched

    def __call__(self, samples):
        if not self.batched:  # automatic batching off: one sample at a time
            index, item = _split_sample(samples)
            return _prepend(torch.tensor(index, dtype=torch.int64), self.collate_fn(item))
        indices, items = [], []
        for s in samples:
            index, item = _split_sample(s)
            indices.append(index)
            items.append(item)
        return _prepend(torch.tensor(indices, dtype=torch.int64), self.collate_fn(items))


def _split_sample(sample) -> tuple[int, Any]:
    if isinstance(sample, _IndexedSample):
        return sample[0], sample.item
    if not isinstance(sample, (tuple, list)) or len(sample) < 2:
        raise TypeError(f"indexed samples must be (index, *item) tuples, got {type(sample).__name__}")
    return int(sample[0]), (sample[1] if len(sample) == 2 else tuple(sample[1:]))


def _prepend(indices: torch.Tensor, batch: Any) -> tuple:
    return (indices, *batch) if isinstance(batch, (tuple, list)) else (indices, batch)


def _check_map_style(dataset: Any, what: str) -> None:
    if isinstance(dataset, IterableDataset):
        raise ValueError(f"{what} is an IterableDataset ({type(dataset).__name__}): its samples have no stable "
                         "index, so teacher outputs cannot be cached per sample. Use a map-style dataset "
                         "(__getitem__ and __len__), or compute the teacher live.")
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise ValueError(f"{what} ({type(dataset).__name__}) is not a map-style dataset (it needs __getitem__ "
                         "and __len__): teacher outputs can only be cached per sample index")


def _check_loader(loader: Any) -> Dataset:
    if not isinstance(loader, DataLoader):
        raise ValueError(f"expected a torch.utils.data.DataLoader over a map-style dataset, got "
                         f"{type(loader).__name__}: a plain iterable of batches has no sample indices, so the "
                         "teacher outputs of its batches cannot be cached or looked up. Wrap the data in a "
                         "map-style Dataset and a DataLoader.")
    dataset = loader.dataset
    _check_map_style(dataset, "the loader's dataset")
    return dataset.dataset if isinstance(dataset, IndexedDataset) else dataset


def _loader_options(loader: DataLoader) -> dict:
    """The worker/memory options of ``loader``, to give a derived DataLoader the same behaviour."""
    opts = dict(num_workers=loader.num_workers, pin_memory=loader.pin_memory, timeout=loader.timeout,
                worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
                prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
                pin_memory_device=loader.pin_memory_device)
    if hasattr(loader, "in_order"):
        opts["in_order"] = loader.in_order
    return opts


def indexed_loader(loader: DataLoader) -> DataLoader:
    """A DataLoader like ``loader`` whose batches are ``(indices, inputs, targets)``.

    It iterates :class:`IndexedDataset` ``(loader.dataset)`` with the *same* sampler object (so the
    same shuffling when the loader was given a seeded ``generator``; ``set_epoch`` on a
    DistributedSampler acts on both), the same batch size / batch sampler, ``drop_last``,
    ``generator``, worker and pinning options, and the same collate function applied to the
    original items (``indices`` is an int64 tensor prepended to its result).

    Raises:
        ValueError: ``loader`` is not a DataLoader, or its dataset is not map-style (an
            IterableDataset or anything without ``__getitem__``/``__len__``): such data has no sample
            indices, so its teacher outputs cannot be cached.
    """
    dataset = _check_loader(loader)
    collate = loader.collate_fn
    if isinstance(collate, _IndexedCollate):  # indexed_loader(indexed_loader(x)) == indexed_loader(x)
        collate = collate.collate_fn
    opts = _loader_options(loader)
    opts["generator"] = loader.generator
    if loader.batch_size is not None:  # the usual case: BatchSampler(sampler, batch_size, drop_last)
        return DataLoader(IndexedDataset(dataset), batch_size=loader.batch_size, sampler=loader.sampler,
                          drop_last=loader.drop_last, collate_fn=_IndexedCollate(collate), **opts)
    if loader.batch_sampler is not None:  # a custom batch sampler
        return DataLoader(IndexedDataset(dataset), batch_sampler=loader.batch_sampler,
                          collate_fn=_IndexedCollate(collate), **opts)
    return DataLoader(IndexedDataset(dataset), batch_size=None, sampler=loader.sampler,  # no auto-batching
                      collate_fn=_IndexedCollate(collate, batched=False), **opts)


# -- the build's loader --------------------------------------------------------------------------

def build_loader(loader: DataLoader, dataset: Dataset, batch_size: Optional[int]) -> DataLoader:
    """A sequential, complete (no drop_last) indexed loader with ``loader``'s batch size and collate."""
    if batch_size is None:
        batch_size = loader.batch_size
        if batch_size is None:
            # a batch sampler given as batch_sampler=, or as sampler= with batch_size=None (then each
            # sampled index list is one batch)
            batcher = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
            batch_size = getattr(batcher, "batch_size", None)
        if batch_size is None:
            raise ValueError("cannot tell the loader's batch size (automatic batching is off or its batch sampler "
                             "has no batch_size): pass batch_size= to the cache build")
    _checks.integer("batch_size", batch_size, ge=1)
    collate = loader.collate_fn
    if isinstance(collate, _IndexedCollate):
        collate = collate.collate_fn
    if loader.batch_sampler is None:  # no auto-batching: its collate_fn converts single samples
        if collate is not default_convert:
            raise ValueError("the loader has automatic batching off (batch_size=None) and a custom collate_fn "
                             "for single samples; give the cache build a batched DataLoader")
        collate = default_collate
    opts = _loader_options(loader)
    opts["persistent_workers"] = False  # one pass
    return DataLoader(IndexedDataset(dataset), batch_size=batch_size, shuffle=False, drop_last=False,
                      collate_fn=_IndexedCollate(collate), **opts)
