"""The machine's ceilings, measured in the same ``distillx bench`` run as the cases, and each case's
floor against them.

- **GEMM rate** (GFLOP/s): ``torch.mm`` of two (n, n) matrices, ``2·n³`` FLOPs per call, best of a
  few repeats after one untimed call; measured in float32 and in the run's dtype. A dtype the machine
  multiplies slowly (bfloat16 on a CPU without native bfloat16 GEMMs: ~1 GFLOP/s, minutes at n =
  4096) is measured at a smaller n that fits :data:`MM_BUDGET_S`; ``mm_sizes`` says which.
- **copy bandwidth** (GB/s): ``dst.copy_(src)`` of a large contiguous float32 tensor of ``S`` bytes,
  ``2·S`` bytes per call (``S`` read + ``S`` written), best of a few repeats after one untimed call
  (which also faults the pages in).

Best of the repeats, not the median: a ceiling is what the machine *can* do. The bench runs
:func:`measure` in a fresh subprocess per thread count (``torch.set_num_threads``), as it runs the
cases. GB and GFLOP are 10⁹.

A case's floor (:func:`floor`) from its cost ``{"flops", "bytes"}`` (``Case.cost``)::

    floor = max(flops / GEMM rate of the run's dtype, bytes / copy bandwidth)

For bfloat16 and float16 the GEMM rate is the better of that dtype's and float32's: an implementation
may convert its inputs and multiply in float32 (distillx's CPU kernels do, with float32 accumulation),
so the floor is what the best GEMM the machine has allows.

a lower bound on the time of any implementation that does at least the case's GEMM FLOPs and
moves at least its bytes; ``% of floor = 100 · floor / median``.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, Mapping, Optional

import torch

MM_SIZE, MM_SIZE_QUICK = 4096, 256
COPY_MB, COPY_MB_QUICK = 256, 16  # MB = 10^6 bytes of the source tensor
REPEATS = 3
MM_BUDGET_S = 10.0  # seconds the timed calls of one dtype's GEMM rate may take, at most about
HALF = ("bfloat16", "float16")


def _best_seconds(call: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` synchronised calls, after one untimed call."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()
    best = math.inf
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def mm_gflops(n: int, dtype: torch.dtype, device: torch.device, repeats: int = REPEATS) -> float:
    """``torch.mm`` rate on (n, n) @ (n, n) in ``dtype``: ``2·n³ / best time / 10⁹`` GFLOP/s."""
    if n < 1:
        raise ValueError(f"mm size n must be a positive integer, got {n!r}")
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    seconds = _best_seconds(lambda: torch.mm(a, b, out=out), device, repeats)
    return 2.0 * n ** 3 / seconds / 1e9


def mm_rate(n: int, dtype: torch.dtype, device: torch.device, repeats: int = REPEATS,
            budget_s: float = MM_BUDGET_S) -> tuple:
    """``(GFLOP/s, size)``: :func:`mm_gflops` at ``n``, or at the largest multiple of 64 below it whose
    ``repeats + 1`` calls a probe at 256 predicts to fit ``budget_s`` (a slow dtype)."""
    probe = min(n, 256)
    if probe < n:
        rate = mm_gflops(probe, dtype, device, repeats=1)
        seconds = 2.0 * n ** 3 / (rate * 1e9) * (repeats + 1)
        if seconds > budget_s:
            n = max(probe, int(n * (budget_s / seconds) ** (1 / 3)) // 64 * 64)
    return mm_gflops(n, dtype, device, repeats), n


def copy_gbps(megabytes: int, device: torch.device, repeats: int = REPEATS) -> float:
    """``copy_`` bandwidth of a ``megabytes``·10⁶-byte float32 tensor: ``2·bytes / best time / 10⁹``
    GB/s (every byte is read once and written once)."""
    if megabytes < 1:
        raise ValueError(f"copy size megabytes must be a positive integer, got {megabytes!r}")
    numel = megabytes * 10 ** 6 // 4
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), device, repeats)
    return 2.0 * numel * 4 / seconds / 1e9


def measure(dtypes: Mapping[str, torch.dtype], device: torch.device, mm_size: int, copy_mb: int,
            repeats: int = REPEATS) -> Dict:
    """Both ceilings in this process, with its current thread count: ``{"threads", "mm_size",
    "mm_gflops": {dtype name: GFLOP/s}, "mm_sizes": {dtype name: n measured at}, "copy_mb",
    "copy_gbps"}`` (``dtypes``: name -> dtype)."""
    rates = {name: mm_rate(mm_size, dt, device, repeats) for name, dt in dtypes.items()}
    return {
        "threads": torch.get_num_threads(),
        "mm_size": mm_size,
        "mm_gflops": {name: r for name, (r, _) in rates.items()},
        "mm_sizes": {name: n for name, (_, n) in rates.items()},
        "copy_mb": copy_mb,
        "copy_gbps": copy_gbps(copy_mb, device, repeats),
    }


def floor(cost: Optional[Mapping[str, float]], ceiling: Optional[Mapping], dtype: str) -> Optional[Dict]:
    """``{"ms", "bound", "compute_ms", "memory_ms", "flops", "bytes"}`` of a case's floor, or None
    without a cost or a ceiling. ``compute_ms = flops / GEMM rate of dtype``, ``memory_ms = bytes /
    copy bandwidth``, ``ms`` their maximum and ``bound`` which one it is ("flops" or "bytes")."""
    if not cost or not ceiling or ceiling.get("error"):
        return None
    rates = ceiling.get("mm_gflops") or {}
    rate = rates.get(dtype)
    if rate and dtype in HALF:
        rate = max(rate, rates.get("float32") or 0.0)
    bandwidth = ceiling.get("copy_gbps")
    if not rate or not bandwidth:
        return None
    compute_ms = cost["flops"] / (rate * 1e9) * 1e3
    memory_ms = cost["bytes"] / (bandwidth * 1e9) * 1e3
    return {"ms": max(compute_ms, memory_ms), "bound": "flops" if compute_ms >= memory_ms else "bytes",
            "compute_ms": compute_ms, "memory_ms": memory_ms, "flops": cost["flops"], "bytes": cost["bytes"]}


def describe(ceiling: Mapping) -> str:
    """One line for the output above the table."""
    if ceiling.get("error"):
        return f"ceilings ({ceiling.get('threads_requested') or 'default'} threads): not measured: {ceiling['error']}"
    sizes = ceiling.get("mm_sizes") or {}
    rates = ", ".join(f"{d} {v:.1f}" + (f" (at {sizes[d]}x{sizes[d]}: slow)" if sizes.get(d, ceiling["mm_size"])
                                        != ceiling["mm_size"] else "")
                      for d, v in ceiling["mm_gflops"].items())
    n = ceiling["mm_size"]
    return (f"ceilings ({ceiling['threads']} thread{'s' if ceiling['threads'] != 1 else ''}): torch.mm {n}x{n} "
            f"GFLOP/s: {rates}; copy_ {ceiling['copy_mb']} MB: {ceiling['copy_gbps']:.1f} GB/s (read + write)")
