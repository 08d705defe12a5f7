"""The cache a distillation run uses (``Distiller(cache_teacher=True)``): built once over the
training set on rank 0 (others wait, then open it), with the teacher's logits and every feature the
methods capture from it, and the indexed loader that looks its rows up."""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from ..engine.batches import LABELS, call_model, logits_of
from ..engine.distributed import DistContext
from .cache import TeacherCache
from .fingerprint import teacher_fingerprint
from .indexed import indexed_loader


def cache_for_run(teacher: nn.Module, loader: Any, *, directory: Optional[str], checkpoint_dir: Optional[str],
                  feature_keys: list[str], collect: Callable[[], Mapping[str, torch.Tensor]], ctx: DistContext,
                  captures: str,
                  device: torch.device, dtype: torch.dtype, top_k: Optional[int],
                  run: Optional[Callable[[Any], Optional[torch.Tensor]]] = None, with_logits: bool = True,
                  label_key: str = LABELS) -> tuple[TeacherCache, Any]:
    """``(cache, indexed loader)``: ``directory`` or ``<checkpoint_dir>/teacher_cache``; ``collect()``
    returns the teacher features captured by the last forward pass (the run's feature hooks);
    ``captures`` describes them (layers, selections, reductions): it goes into the cache's
    fingerprint beside the teacher's weights and code, and the inputs are verified too, so a cache
    built for other captures or other data is rebuilt, never reused.

    ``run(inputs)`` runs the teacher on one batch's inputs and returns its logits (default: the
    teacher's logits); with ``with_logits=False`` nothing reads them and they are not cached.
    """
    directory = directory or (os.path.join(checkpoint_dir, "teacher_cache") if checkpoint_dir else None)
    if directory is None:
        raise ValueError("cache_teacher=True needs a place for the cache: pass cache_dir= or checkpoint_dir=")
    indexed = indexed_loader(loader)
    was = teacher.training
    teacher.eval()
    if run is None:
        def run(inputs):
            return logits_of(call_model(teacher, inputs, "teacher"), "teacher")

    def capture(inputs):
        logits = run(inputs)
        return {**({"logits": logits} if with_logits and logits is not None else {}), **collect()}

    keys = (["logits"] if with_logits else []) + list(feature_keys)
    try:
        cache = None
        if ctx.is_main:
            # Iterating the cache's own loader draws a seed from the global generator: fork it, so
            # a run sees the same random stream with and without the cache.
            fingerprint = teacher_fingerprint(teacher, len(indexed.dataset),
                                              extra=f"logits={with_logits}\n{captures}")
            with torch.random.fork_rng(devices=[]):
                cache = TeacherCache.build_or_open(teacher, indexed, directory, capture=capture, device=device,
                                                   expect_keys=keys, dtype=dtype, top_k=top_k, label_key=label_key,
                                                   fingerprint=fingerprint)
        ctx.barrier()  # the other ranks open what rank 0 built
        if not ctx.is_main:
            cache = TeacherCache.open(directory, expect_keys=keys)
    finally:
        teacher.train(was)
    return cache, indexed
