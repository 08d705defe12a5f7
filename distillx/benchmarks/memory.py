"""Peak extra memory of one forward+backward ("extra": over what was allocated before the call, i.e.
over the inputs; the gradients and every temporary count).

CUDA: ``torch.cuda.reset_peak_memory_stats``, then ``max_memory_allocated - memory_allocated`` around
the call (bytes handed out by the caching allocator, not what it reserved).

CPU has no allocator statistics, so the resident set of the process is measured:

1. glibc is told to return freed blocks to the OS (``mallopt(M_MMAP_THRESHOLD, 64 KiB)`` so every block
   of 64 KiB or more is its own mapping, unmapped on ``free``; ``mallopt(M_TRIM_THRESHOLD, 0)``) and
   ``malloc_trim(0)`` releases what it cached. These are the settings the ``MALLOC_MMAP_THRESHOLD_=65536``
   and ``MALLOC_TRIM_THRESHOLD_=0`` environment variables give; they are set with ``mallopt`` right before
   the measurement instead, so that the timed repeats that come before it run with glibc's normal
   settings (a 64 KiB mmap threshold would add page faults to every medium-sized allocation and bias the
   timings against chunked kernels). The runner measures in a fresh subprocess per case x
   implementation, so the switch never affects another measurement.
2. ``gc.collect()``; writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's peak-RSS counter
   (VmHWM) to the current RSS; VmRSS is read as the baseline.
3. One forward+backward; peak extra = VmHWM - baseline.

If ``/proc/self/clear_refs`` cannot be written, a thread samples VmRSS every 0.5 ms during the call
(method ``"sampled"``; short peaks can be missed); without ``/proc`` there is no CPU number.
:func:`calibrate_cpu` checks the method: a no-op must show ~0 MB, allocating and freeing 400 MB ~400 MB.

MB here is 10^6 bytes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import threading
from typing import Callable, Dict, Optional

import torch

MB = 1e6
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 65536


def _status_kb(*keys: str) -> Dict[str, int]:
    out = {}
    with open(_STATUS) as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0])  # "VmRSS:   12345 kB"
    return out


def _libc():
    try:
        libc = ctypes.CDLL(None)  # the symbols of the running process (glibc's malloc on Linux)
        libc.mallopt  # noqa: B018 - raises AttributeError when absent
        return libc
    except (OSError, AttributeError):
        name = ctypes.util.find_library("c")
        return ctypes.CDLL(name) if name else None


def trim_heap() -> bool:
    """``malloc_trim(0)``: give glibc's cached free memory back to the OS. False when unavailable."""
    libc = _libc()
    try:
        libc.malloc_trim(0)
        return True
    except (AttributeError, TypeError):
        return False


def return_freed_memory_to_os() -> bool:
    """Switch glibc to unmap/trim every freed block of 64 KiB or more (see the module docstring).

    Permanent for the process. Returns False when the allocator is not glibc's (e.g. tcmalloc/jemalloc
    preloaded, musl); the measurement then over-reports by whatever the allocator keeps cached.
    """
    libc = _libc()
    try:
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, 0) == 1 and ok
    except (AttributeError, TypeError):
        return False
    trim_heap()
    return ok


def _reset_peak_rss() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _RssSampler(threading.Thread):
    def __init__(self, interval_s: float = 5e-4):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak_kb = _status_kb("VmRSS")["VmRSS"]
        self._stop = threading.Event()

    def run(self):
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _status_kb("VmRSS")["VmRSS"])
            self._stop.wait(self.interval_s)

    def stop(self) -> int:
        self._stop.set()
        self.join()
        self.peak_kb = max(self.peak_kb, _status_kb("VmRSS")["VmRSS"])
        return self.peak_kb


def measure_cpu(call: Callable[[], object]) -> Dict[str, object]:
    """Peak RSS growth (MB) during ``call()``; see the module docstring. Returns peak_mb, method, note."""
    try:
        _status_kb("VmRSS")
    except OSError:
        call()
        return {"peak_mb": None, "method": "unavailable", "note": f"{_STATUS} is not readable"}
    gc.collect()
    trim_heap()
    if _reset_peak_rss():
        base_kb = _status_kb("VmRSS")["VmRSS"]
        call()
        peak_kb = _status_kb("VmHWM")["VmHWM"]
        return {"peak_mb": max(peak_kb - base_kb, 0) * 1024 / MB, "method": "clear_refs", "note": None}
    sampler = _RssSampler()
    base_kb = sampler.peak_kb
    sampler.start()
    try:
        call()
    finally:
        peak_kb = sampler.stop()
    return {"peak_mb": max(peak_kb - base_kb, 0) * 1024 / MB, "method": "sampled",
            "note": f"{_CLEAR_REFS} is not writable: VmRSS sampled every 0.5 ms (short peaks may be missed)"}


def measure_cuda(call: Callable[[], object], device: torch.device) -> Dict[str, object]:
    """Peak bytes allocated by the caching allocator during ``call()`` over those allocated before (MB)."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mb": max(peak - base, 0) / MB, "method": "cuda_max_memory_allocated", "note": None}


def measure(call: Callable[[], object], device: torch.device) -> Dict[str, object]:
    if device.type == "cuda":
        return measure_cuda(call, device)
    return measure_cpu(call)


def calibrate_cpu(size_mb: float = 400.0) -> Dict[str, Optional[float]]:
    """Check the CPU method in this process: a no-op and allocating + freeing ``size_mb`` MB.

    Call it after :func:`return_freed_memory_to_os` (as the runner does); expect ~0 and ~size_mb.
    """
    def noop():
        return None

    def alloc_free():
        x = torch.empty(int(size_mb * MB) // 4, dtype=torch.float32)
        x.fill_(1.0)  # touch every page
        del x

    first = measure_cpu(noop)
    second = measure_cpu(alloc_free)
    return {"method": second["method"], "noop_mb": first["peak_mb"], "alloc_mb": size_mb,
            "measured_alloc_mb": second["peak_mb"], "note": second["note"]}
