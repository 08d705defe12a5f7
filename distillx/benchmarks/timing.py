"""Forward+backward timing.

CPU: ``time.perf_counter`` around ``loss = fn(...); loss.backward()``, Python's garbage collector
paused for the call (as ``timeit`` does). CUDA: CUDA events recorded on the current stream around the
same call, after a ``torch.cuda.synchronize()``, read after the end event completes. Gradients are set
to ``None`` between repeats, outside the timed region, so every repeat allocates its gradients afresh
(as a training step with ``zero_grad(set_to_none=True)`` does).
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def clear_grads(leaves: Sequence[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


def forward_backward(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    loss = fn()
    if loss.dim() != 0:
        loss = loss.sum()
    loss.backward()
    return loss.detach()


def _wall(call, device: torch.device) -> float:
    """Seconds of one synchronised call (used for warm-up, where compilation happens)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _timed_ms(call, device: torch.device) -> float:
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        call()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        call()
        return (time.perf_counter() - t0) * 1e3
    finally:
        if gc_was_enabled:
            gc.enable()


MIN_REPEATS = 3


def time_forward_backward(fn: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], device: torch.device,
                          repeats: int, warmup: int, max_time_s: Optional[float] = None) -> Dict[str, object]:
    """Run ``warmup`` untimed then up to ``repeats`` timed forward+backward passes of ``fn``.

    With ``max_time_s``, the timed repeats stop once they have taken that long in total, after at least
    ``MIN_REPEATS`` (or ``repeats`` if fewer): slow cases get fewer repeats, fast ones all of them.
    Returns the per-repeat times (ms), their median/min/mean, and the wall time of every warm-up call
    (the first one includes any compilation).
    """
    def call():
        forward_backward(fn)

    warmup_s: List[float] = []
    for _ in range(warmup):
        clear_grads(leaves)
        warmup_s.append(_wall(call, device))
    times: List[float] = []
    for _ in range(repeats):
        if max_time_s and len(times) >= MIN_REPEATS and sum(times) / 1e3 >= max_time_s:
            break
        clear_grads(leaves)
        gc.collect()
        times.append(_timed_ms(call, device))
    clear_grads(leaves)
    out: Dict[str, object] = {"warmup_s": warmup_s, "times_ms": times}
    if times:
        out.update(median_ms=statistics.median(times), min_ms=min(times), mean_ms=statistics.fmean(times))
    return out
