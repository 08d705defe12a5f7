"""Run by test_signals.py in a fresh process (a forced stop may end the process): distil on 256
digits, 4 steps per epoch, checkpoints in ``<out>``, and send this process signals during step
``AT`` (its task-loss call; the third step of the second epoch):

- ``repeat``: SIGINT then SIGTERM at once, as when a Ctrl-C reaches a worker directly and again
  through its launcher: one interruption, so training stops at that step with a checkpoint;
- ``later``: SIGINT, then, once this process has seen it and the signal window has passed, SIGINT
  again while the step is still running: a stop at once, without a checkpoint of that step.

Prints ``INTERRUPTED <epoch> <step>`` (TrainingInterrupted, and the checkpoint's position) or
``STOPPED <message>`` (KeyboardInterrupt). :func:`signalled_digits` sends the same signals from a
``distillx run`` data builder.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

import distillx as dx
from distillx.config.data import digits
from distillx.engine import TrainingInterrupted
from distillx.engine import checkpoint as ckpt
from distillx.engine.signals import SignalGuard
from distillx.testing import data, loader, student, teacher

AT = 7  # 4 steps per epoch (validation is off): the third step of the second epoch


def wait_until(condition, what: str, limit: float = 120.0) -> None:
    """Poll ``condition`` in Python (so a pending signal handler runs); a hang guard, not a timing."""
    end = time.monotonic() + limit
    while not condition():
        if time.monotonic() > end:
            print(f"GAVE UP waiting for {what}", flush=True)
            os._exit(5)
        time.sleep(0.01)


def send(mode: str) -> None:
    """The signals of ``mode`` (see the module docstring), sent to this process."""
    os.kill(os.getpid(), signal.SIGINT)
    if mode == "repeat":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    guard = SignalGuard._active
    wait_until(lambda: guard._first_at is not None, "the watchdog to see the first signal")
    first = guard._first_at
    # Past the window on the watchdog's own clock, so the next signal is a second one.
    wait_until(lambda: time.monotonic() > first + guard.window, "the signal window to pass")
    os.kill(os.getpid(), signal.SIGINT)
    wait_until(lambda: False, "KeyboardInterrupt")  # the handler raises while this polls


class SignalsAt:
    """Cross-entropy; sends the signals of ``mode`` on its ``AT``-th call."""

    def __init__(self, mode: str):
        self.mode, self.calls = mode, 0

    def __call__(self, logits, targets):
        self.calls += 1
        if self.calls == AT:
            send(self.mode)
        return F.cross_entropy(logits, targets)


class _Signalling:
    def __init__(self, loader, mode: str):
        self.loader, self.mode, self.passes = loader, mode, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(self.loader):
            yield batch
            if self.passes == 2 and i == 1:  # as the loop asks for the third batch of the second epoch
                send(self.mode)


def signalled_digits(mode: str = "later", **options):
    """``distillx run``'s digits data (``data.builder = "signal_script:signalled_digits"``), sending
    the signals of ``mode`` after the second batch of the second pass over the training loader."""
    data = digits(**options)
    return {"train": _Signalling(data["train"], mode), "val": data["val"]}


def main(mode: str, out: str) -> None:
    torch.set_num_threads(1)
    x, y, _, _ = data(256)
    d = dx.Distiller(teacher(), student(), [dx.method("kd", T=2.0)], task_loss=SignalsAt(mode), checkpoint_dir=out,
                     progress=False)
    try:
        d.fit(loader(x, y, batch_size=64, seed=0), 3)
    except TrainingInterrupted as exc:
        at = ckpt.load(exc.path)["position"]
        print(f"INTERRUPTED {at['epoch']} {at['step']}", flush=True)
    except KeyboardInterrupt as exc:
        print(f"STOPPED {exc}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
