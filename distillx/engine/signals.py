"""SIGINT/SIGTERM during training: a flag the loop honours between steps, and a way out when it cannot.

:class:`SignalGuard` is entered by :meth:`distillx.Distiller.fit` (and every phase's loop); see its
docstring for the rule that tells one interruption delivered several times from a request to stop
at once. ``DISTILLX_SIGNAL_WINDOW`` (seconds, default 2) sets that rule's window.
"""
from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time
from typing import Optional

WINDOW_ENV = "DISTILLX_SIGNAL_WINDOW"
DEFAULT_WINDOW = 2.0


def signal_window() -> float:
    """Seconds within which further signals repeat the first (``DISTILLX_SIGNAL_WINDOW``, default 2)."""
    raw = os.environ.get(WINDOW_ENV, "").strip()
    if not raw:
        return DEFAULT_WINDOW
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{WINDOW_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def _who() -> str:
    """``rank K`` under torchrun (its environment names the rank), else ``pid N``."""
    rank = os.environ.get("RANK")
    return f"rank {rank}" if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else f"pid {os.getpid()}"


class SignalGuard:
    """Turns SIGINT/SIGTERM into a flag (``signum``) that the loop checks between steps (main thread only).

    The rule for several signals:

    - the first signal sets the flag; the loop writes a checkpoint at the next step boundary and
      raises :class:`~distillx.engine.loop.TrainingInterrupted`;
    - further signals within ``window`` seconds of the first (``DISTILLX_SIGNAL_WINDOW``, default 2)
      are the same interruption delivered again and are ignored. Ctrl-C in a terminal reaches every
      ``torchrun`` worker directly and once more through ``torchrun``, which forwards it;
    - a signal later than that, while the flag is still pending, means "stop now, without a
      checkpoint": ``KeyboardInterrupt`` is raised in the main thread (the last checkpoint stays).
      When the main thread cannot take it within ``exit_grace`` seconds — it is blocked in native
      code, typically a collective waiting for a rank that never comes — the process prints why on
      stderr and exits with status 128 + the signal's number.

    The signals are counted by a watchdog thread that reads them from ``signal.set_wakeup_fd``: the
    interpreter runs a Python handler only when the main thread returns to Python, which a rank
    blocked in a collective never does. The handler itself only sets the flag (so a signal a step
    sends itself is seen at that step's end) and raises once the watchdog has called for a stop.

    Guards nest: entering one while another is active returns the active one, so a signal caught
    while :class:`distillx.Distiller` sets up a phase (transfer, the dry forward pass that builds
    adapters, the teacher cache) is seen by the loop that starts next.
    """

    _active: Optional["SignalGuard"] = None
    exit_grace = 1.0  # seconds the main thread has to raise KeyboardInterrupt before the process exits

    def __init__(self, window: Optional[float] = None):
        self.signum: Optional[int] = None
        self.window = signal_window() if window is None else float(window)
        self.forced: Optional[int] = None  # the signal that called for a stop now
        self._first_at: Optional[float] = None  # the watchdog's clock when it saw the first signal
        self._old: dict = {}
        self._old_wakeup = -1
        self._pipe: Optional[tuple[int, int]] = None
        self._done = threading.Event()
        self._watchdog: Optional[threading.Thread] = None
        self._outer: Optional[SignalGuard] = None

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is not threading.main_thread():
            return self
        if SignalGuard._active is not None:
            self._outer = SignalGuard._active
            return self._outer
        read, write = os.pipe()
        os.set_blocking(write, False)  # set_wakeup_fd's requirement: a signal handler never blocks
        self._pipe = (read, write)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        self._old_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._done.clear()
        self._watchdog = threading.Thread(target=self._watch, args=(read,), name="distillx-signals", daemon=True)
        self._watchdog.start()
        SignalGuard._active = self
        return self

    def _handle(self, signum, frame):
        if self.forced is not None:
            raise KeyboardInterrupt(f"stopped by a second {signal.Signals(self.forced).name} without a checkpoint "
                                    "(the last checkpoint written is kept)")
        if self.signum is None:
            self.signum = signum

    # -- the watchdog thread -------------------------------------------------------------------
    def _watch(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:  # __exit__ closed the write end
                return
            now = time.monotonic()
            for signum in data:
                if self._saw(signum, now):
                    self._stop_now(signum)
                    return

    def _saw(self, signum: int, now: float) -> bool:
        """Apply the rule to one signal; True when it calls for a stop now."""
        if signum not in (signal.SIGINT, signal.SIGTERM):
            return False
        if self._first_at is None:
            self._first_at = now
            if self.signum is None:
                self.signum = signum
            print(f"distillx ({_who()}): {signal.Signals(signum).name} received: stopping at the end of this step, "
                  f"with a checkpoint (a further signal more than {self.window:g} s from now stops at once, without "
                  "one)", file=sys.stderr, flush=True)
            return False
        return now - self._first_at > self.window

    def _stop_now(self, signum: int) -> None:
        self.forced = signum
        # The handler may have run for this signal before the flag above was set: run it again.
        _thread.interrupt_main(signal.SIGINT)
        if self._done.wait(self.exit_grace):  # the main thread took it and left the guard
            return
        name = signal.Signals(signum).name
        print(f"distillx ({_who()}): a second {name} while the main thread is blocked outside Python (in a "
              "collective waiting for another rank, or in native code): exiting now, without a checkpoint (the "
              f"last checkpoint written is kept); exit status {128 + signum}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def __exit__(self, *exc):
        if self._outer is not None:
            self._outer = None
            return
        if self._pipe is None:  # not the main thread: nothing was installed
            return
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        self._done.set()
        read, write = self._pipe
        self._pipe = None
        os.close(write)  # the watchdog reads end-of-file and returns
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=5)
        os.close(read)
        self._watchdog = None
        if SignalGuard._active is self:
            SignalGuard._active = None
