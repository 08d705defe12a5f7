"""A rank stuck in a collective that another rank never joins can be ended: by a second signal
(SIGTERM twice, past the signal window: the watchdog of engine/signals.SignalGuard), or by the
collective timeout of the process group distillx starts (DISTILLX_COLLECTIVE_TIMEOUT), with an
error naming the rank. Before either, such a rank waited for gloo's 30 minutes, deaf to signals."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest
import torch

from distillx.testing import child_env

from .processes import TORCHRUN, Launched

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ranks_script.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")
WINDOW = 0.2  # DISTILLX_SIGNAL_WINDOW for these runs


def test_a_second_signal_ends_a_rank_blocked_in_a_collective():
    env = child_env(DISTILLX_SIGNAL_WINDOW=str(WINDOW))  # the collective timeout stays at its default (600 s)
    with Launched([*TORCHRUN, SCRIPT, "signals"], env) as run:
        pid = int(re.search(r"WAITING pid=(\d+)", run.wait_for("WAITING pid=")).group(1))
        os.kill(pid, signal.SIGTERM)
        run.wait_for("SIGTERM received")  # the watchdog saw the first one: the flag is set, training would stop
        # The second signal must come later than the window after the first, on the watchdog's clock:
        # it printed the line above after reading the first, so waiting 5 windows from here is enough.
        time.sleep(5 * WINDOW)
        os.kill(pid, signal.SIGTERM)
        run.finish()
    assert "a second SIGTERM while the main thread is blocked outside Python" in run.output, run.output[-3000:]
    assert "exit status 143" in run.output
    assert "RETURNED" not in run.output and "COLLECTIVE_ERROR" not in run.output  # ended by the signal, not a timeout


def test_a_collective_timeout_ends_a_rank_waiting_for_an_absent_one_naming_it():
    env = child_env(DISTILLX_COLLECTIVE_TIMEOUT="3")
    with Launched([*TORCHRUN, SCRIPT, "timeout"], env) as run:
        run.finish()
    expected = "COLLECTIVE_ERROR rank 1 of 2: the collective all_reduce (any) failed: another rank did not join it"
    assert expected in run.output, run.output[-3000:]
    assert "DISTILLX_COLLECTIVE_TIMEOUT" in run.output


def test_a_bad_collective_timeout_is_an_error_naming_the_variable(monkeypatch):
    from distillx.engine.distributed import collective_timeout

    monkeypatch.setenv("DISTILLX_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="DISTILLX_COLLECTIVE_TIMEOUT must be a number of seconds > 0, got 'soon'"):
        collective_timeout()
    monkeypatch.setenv("DISTILLX_COLLECTIVE_TIMEOUT", "2.5")
    assert collective_timeout().total_seconds() == 2.5
