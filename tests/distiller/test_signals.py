"""SIGINT/SIGTERM during training (engine/signals.SignalGuard): the same interruption delivered
several times stops with a checkpoint; a further signal past the window stops at once. The rule
itself is checked directly; real signals are sent in fresh processes (a forced stop ends the
process it happens in)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from distillx.engine import checkpoint as ckpt
from distillx.engine.signals import SignalGuard
from distillx.testing import child_env

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "signal_script.py")


def launch(mode, out, **env):
    done = subprocess.run([sys.executable, SCRIPT, mode, str(out)], env=child_env(**env), capture_output=True,
                          text=True, timeout=300)  # a hang guard
    return done, done.stdout + done.stderr


def test_the_rule_counts_signals_within_the_window_as_one_and_a_later_one_as_a_stop():
    guard = SignalGuard(window=2.0)
    assert guard._saw(signal.SIGINT, 100.0) is False and guard.signum == signal.SIGINT  # the first: the flag
    assert guard._saw(signal.SIGTERM, 101.5) is False  # within the window: the same interruption again
    assert guard._saw(signal.SIGINT, 102.0) is False   # the window's end still counts as the same
    assert guard.signum == signal.SIGINT
    assert guard._saw(signal.SIGINT, 102.5) is True    # later, still pending: stop now
    assert SignalGuard(window=0.0)._saw(signal.SIGINT, 0.0) is False  # a window of 0: every later signal stops


def test_a_guard_leaves_the_handlers_and_the_wakeup_fd_as_it_found_them():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    wakeup = signal.set_wakeup_fd(-1)  # reading it means setting it: put it back at once
    signal.set_wakeup_fd(wakeup)
    with SignalGuard() as guard:
        with SignalGuard() as inner:
            assert inner is guard  # nested guards share the outer one
        assert signal.getsignal(signal.SIGINT) == guard._handle
        watchdog = guard._watchdog
        assert watchdog.is_alive()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert signal.set_wakeup_fd(wakeup) == wakeup
    assert not watchdog.is_alive() and SignalGuard._active is None


def test_signals_delivered_twice_in_one_step_end_in_a_checkpoint_of_that_step(tmp_path):
    done, out = launch("repeat", tmp_path / "ckpt")
    assert done.returncode == 0, out[-3000:]
    # The old guard raised KeyboardInterrupt on the second signal: a traceback and no checkpoint of the step.
    assert "INTERRUPTED 1 3" in done.stdout, out[-3000:]
    assert "Traceback" not in out and "STOPPED" not in out
    assert ckpt.load(str(tmp_path / "ckpt" / "checkpoint.pt"))["position"]["step"] == 3


def test_a_signal_after_the_window_stops_at_once_without_a_checkpoint_of_the_step(tmp_path):
    done, out = launch("later", tmp_path / "ckpt", DISTILLX_SIGNAL_WINDOW="0.2")
    assert done.returncode == 0, out[-3000:]
    assert "STOPPED stopped by a second SIGINT without a checkpoint" in done.stdout, out[-3000:]
    assert "INTERRUPTED" not in out
    # the checkpoint on disk is the last one written before: the end of the first epoch
    position = ckpt.load(str(tmp_path / "ckpt" / "checkpoint.pt"))["position"]
    assert (position["epoch"], position["step"]) == (1, 0)


def test_distillx_run_stopped_by_a_later_signal_says_so_and_exits_130(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "distillx.cli", "run", "digits", "--set", f"output_dir={out}",
                           "--set", "teacher.epochs=0", "--set", "student.epochs=3",
                           "--set", "data.builder=signal_script:signalled_digits"],
                          env=child_env(DISTILLX_SIGNAL_WINDOW="0.2",
                                        PYTHONPATH=f"{HERE}{os.pathsep}{child_env()['PYTHONPATH']}"),
                          capture_output=True, text=True, timeout=300)  # a hang guard
    assert done.returncode == 130, done.stderr[-3000:]
    assert ("distillx run: stopped by a second SIGINT without a checkpoint (the last checkpoint written is kept); "
            "--resume continues from output_dir's checkpoint.pt, if one was written") in done.stderr, \
        done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    position = ckpt.load(str(out / "checkpoint.pt"))["position"]
    assert (position["epoch"], position["step"]) == (1, 0)  # the first epoch's checkpoint, nothing later
