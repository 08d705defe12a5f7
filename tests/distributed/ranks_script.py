"""Run by test_stuck.py and test_agreement.py under torchrun with 2 gloo ranks.

- ``signals``: rank 1 waits in a collective rank 0 never joins, inside a SignalGuard (as ``fit``
  does), and prints ``WAITING pid=<pid>`` once it stands at the wait; the test signals it.
- ``timeout``: the same wait without signals; the collective timeout (``DISTILLX_COLLECTIVE_TIMEOUT``,
  set by the test) ends it, and rank 1 prints ``COLLECTIVE_ERROR <the error>``.
- ``disagree``: a Distiller whose ``strategy`` is ``$RANK1_STRATEGY`` on rank 1 ("ddp" on rank 0)
  runs ``fit``; each rank prints ``REFUSED <the error>``.

In the first two, rank 0 stays alive without entering the collective until torchrun stops it.
"""
from __future__ import annotations

import linecache
import os
import sys
import threading
import time

import torch

import distillx as dx
from distillx.engine.distributed import CollectiveError, RanksDisagree, init_from_env
from distillx.engine.signals import SignalGuard
from distillx.testing import data, loader, student, teacher


def announce_when_waiting(main: int) -> None:
    """Print ``WAITING`` once the main thread stands at a collective's ``work.wait()``: from there it
    enters the wait without running Python (so the test's signals find it blocked in native code)."""
    while True:
        frame = sys._current_frames().get(main)
        if frame is not None and ".wait(" in linecache.getline(frame.f_code.co_filename, frame.f_lineno) \
                and f"torch{os.sep}distributed" in frame.f_code.co_filename:
            print(f"WAITING pid={os.getpid()}", flush=True)
            return
        time.sleep(0.01)


def wait_in_a_collective(ctx) -> None:
    if ctx.rank == 0:
        time.sleep(600)  # absent, not dead: torchrun's SIGTERM ends this once rank 1 has failed
        return
    with SignalGuard():
        threading.Thread(target=announce_when_waiting, args=(threading.get_ident(),), daemon=True).start()
        try:
            ctx.any(False)
        except CollectiveError as exc:
            print(f"COLLECTIVE_ERROR {exc}", flush=True)
            sys.exit(3)
    print("RETURNED", flush=True)
    sys.exit(4)


def disagree(ctx) -> None:
    torch.set_num_threads(1)
    x, y, _, _ = data(128)
    strategy = os.environ["RANK1_STRATEGY"] if ctx.rank == 1 else "ddp"
    d = dx.Distiller(teacher(), student(), [dx.method("kd", T=2.0)], strategy=strategy, progress=False)
    try:
        d.fit(loader(x, y, batch_size=32, seed=0), 1)
    except RanksDisagree as exc:
        print(f"REFUSED {exc}", flush=True)
        return
    print("TRAINED", flush=True)


def main(mode: str) -> None:
    ctx = init_from_env(torch.device("cpu"))
    try:
        (disagree if mode == "disagree" else wait_in_a_collective)(ctx)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
