"""Machinery behind ``distillx bench`` (the command itself lives in :mod:`distillx.cli.bench`).

- :mod:`.cases`   the declarative table of benchmark cases (one row per op; add a row to add a case);
- :mod:`.timing`  forward+backward timing (``time.perf_counter`` on CPU, CUDA events on GPU);
- :mod:`.memory`  peak extra memory of one forward+backward (resident-set growth on CPU,
                  the caching allocator's peak on CUDA);
- :mod:`.ceilings` the machine's torch.mm rate and copy bandwidth, and a case's floor against them;
- :mod:`.runner`  measures one case x implementation (or the ceilings), in-process or in a fresh subprocess.

Nothing here is imported by ``import distillx``.
"""
from __future__ import annotations

from .cases import CASES, Case, get_case, register_case

__all__ = ["CASES", "Case", "get_case", "register_case"]
