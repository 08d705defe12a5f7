"""ProgressBar: output format, auto-enable (TTY, DISTILLX_QUIET), rate limiting, running means."""
import io
import time

import pytest
import torch

from distillx.reporting import ProgressBar
from distillx.reporting import progress


class TTY(io.StringIO):
    def isatty(self):
        return True


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("DISTILLX_QUIET", raising=False)


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(progress, "_now", c)
    return c


def redraws(text):
    return [seg for seg in text.split("\r") if seg]


def test_enabled_output_format(clock):
    out = io.StringIO()
    bar = ProgressBar(120, "student 3/20", stream=out, enabled=True, min_interval=0)
    for _ in range(37):
        clock.t += 0.01
        bar.update(32, loss=0.4123, task=0.2012, kd=0.2111)
    line = redraws(out.getvalue())[-1]
    assert line.startswith("student 3/20")
    assert " 37/120 [" in line and "#" in line and "." in line
    for part in ("loss 0.4123", "task 0.2012", "kd 0.2111", "3200 samples/s", "eta 0:00:01"):
        assert part in line, (part, line)
    assert "\n" not in out.getvalue()
    bar.close(val_accuracy=0.8123)
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    final = redraws(text)[-1]
    assert "37/120" in final and "val_accuracy 0.8123" in final and "in 0:00:00" in final
    assert "samples/s" in final


def test_exact_line_with_fake_clock(clock):
    out = io.StringIO()
    bar = ProgressBar(20, "teacher", stream=out, enabled=True, min_interval=0)
    for _ in range(10):
        clock.t += 0.1
        bar.update(100, loss=1.5)
    assert redraws(out.getvalue())[-1] == ("teacher  10/20 [##########..........]  loss 1.5000  "
                                           "1000 samples/s  eta 0:00:01")
    assert bar.rate == pytest.approx(1000.0) and bar.steps == 10 and bar.n_samples == 1000


def test_unknown_total_has_no_bar_and_no_eta(clock):
    out = io.StringIO()
    bar = ProgressBar(None, "run", stream=out, enabled=True, min_interval=0)
    clock.t += 2.0
    bar.update(10, loss=2.0)
    line = redraws(out.getvalue())[-1]
    assert line == "run  1 steps  loss 2.0000  5.0 samples/s"


def test_running_means_are_per_sample_and_accept_tensors(clock):
    bar = ProgressBar(4, "x", stream=io.StringIO(), enabled=True)
    w = torch.tensor(3.0, requires_grad=True)
    bar.update(10, loss=1.0, kd=w * 1.0)
    bar.update(30, loss=3.0, kd=w * 2.0)
    means = bar.means
    assert means["loss"] == pytest.approx(2.5)  # (10*1 + 30*3) / 40
    assert means["kd"] == pytest.approx((10 * 3 + 30 * 6) / 40)
    assert not bar._sums["kd"].requires_grad  # no graph kept alive across steps


def test_disabled_when_stream_is_not_a_tty():
    out = io.StringIO()
    bar = ProgressBar(10, "x", stream=out)
    assert bar.enabled is False
    bar.update(5, loss=object())  # a disabled bar does not even look at the values
    bar.close(val_accuracy=0.5)
    assert out.getvalue() == ""


def test_auto_enabled_on_a_tty():
    out = TTY()
    bar = ProgressBar(10, "x", stream=out, min_interval=0)
    assert bar.enabled is True
    bar.update(5, loss=1.0)
    bar.close()
    assert "x" in out.getvalue() and out.getvalue().endswith("\n")


@pytest.mark.parametrize("value", ["1", "true", "YES", "on", "anything"])
def test_quiet_env_disables(monkeypatch, value):
    monkeypatch.setenv("DISTILLX_QUIET", value)
    out = TTY()
    with ProgressBar(10, "x", stream=out) as bar:
        assert bar.enabled is False
        bar.update(5, loss=1.0)
    assert out.getvalue() == ""


@pytest.mark.parametrize("value", ["", "0", "false", "No", "off"])
def test_quiet_env_false_values_keep_it_on(monkeypatch, value):
    monkeypatch.setenv("DISTILLX_QUIET", value)
    assert ProgressBar(10, "x", stream=TTY()).enabled is True


def test_explicit_enabled_overrides_auto(monkeypatch):
    monkeypatch.setenv("DISTILLX_QUIET", "1")
    assert ProgressBar(10, "x", stream=io.StringIO(), enabled=True).enabled is True
    assert ProgressBar(10, "x", stream=TTY(), enabled=False).enabled is False


def test_default_stream_is_stderr_at_construction(capsys):
    bar = ProgressBar(2, "to-stderr", enabled=True, min_interval=0)
    bar.update(1, loss=1.0)
    bar.close()
    err = capsys.readouterr().err
    assert "to-stderr" in err and err.endswith("\n")


def test_rate_limited_with_fake_clock(clock):
    out = io.StringIO()
    bar = ProgressBar(1000, "x", stream=out, enabled=True, min_interval=0.1)
    for _ in range(1000):
        clock.t += 0.001  # 1 s in total
        bar.update(8, loss=1.0)
    assert 9 <= bar.redraws <= 11
    assert len(redraws(out.getvalue())) == bar.redraws


def test_rate_limited_tight_loop():
    out = io.StringIO()
    bar = ProgressBar(20000, "x", stream=out, enabled=True, min_interval=0.1)
    start = time.monotonic()
    for _ in range(20000):
        bar.update(8, loss=0.5, kd=0.25)
    elapsed = time.monotonic() - start
    n = out.getvalue().count("\r")
    assert n == bar.redraws
    assert n <= elapsed / 0.1 + 2, (n, elapsed)
    assert n < 200


def test_shorter_line_blanks_the_previous_one(clock):
    out = io.StringIO()
    bar = ProgressBar(None, "x", stream=out, enabled=True, min_interval=0)
    clock.t += 1
    bar.update(1, loss=99999.0)
    bar.update(10000, loss=0.0)
    first, second = redraws(out.getvalue())
    assert "loss 99999.0000" in first and "loss 9.9989" in second
    assert len(second) >= len(first) and second.rstrip() != second


def test_narrow_terminal_keeps_desc_count_and_throughput(monkeypatch, clock):
    monkeypatch.setenv("COLUMNS", "70")
    out = io.StringIO()
    bar = ProgressBar(120, "student 3/20", stream=out, enabled=True, min_interval=0)
    for _ in range(5):
        clock.t += 0.5
        bar.update(32, loss=0.4123, task=0.2012, kd=0.2111, at=12.5, sld=0.001)
    for line in redraws(out.getvalue()):
        assert len(line.rstrip()) <= 69
        assert line.startswith("student 3/20") and "/120" in line and "samples/s" in line and "eta" in line
        assert "loss 0.4123" in line and "..." in line  # values cut short, not the essentials
    bar.close(val_accuracy=0.9)
    assert "val_accuracy 0.9000" in redraws(out.getvalue())[-1]  # the final line is never cut


def test_context_manager_closes_on_error():
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with ProgressBar(10, "ctx", stream=out, enabled=True, min_interval=0) as bar:
            bar.update(4, loss=1.0)
            raise RuntimeError("boom")
    assert bar.closed and out.getvalue().endswith("\n")


def test_close_is_idempotent_and_update_after_close_is_ignored():
    out = io.StringIO()
    bar = ProgressBar(3, "x", stream=out, enabled=True, min_interval=0)
    bar.update(1, loss=1.0)
    bar.close()
    text = out.getvalue()
    bar.close()
    bar.update(1, loss=2.0)
    assert out.getvalue() == text and bar.steps == 1


def test_broken_stream_disables_instead_of_raising():
    class Broken(io.StringIO):
        def write(self, s):
            raise BrokenPipeError("gone")

    bar = ProgressBar(3, "x", stream=Broken(), enabled=True, min_interval=0)
    bar.update(1, loss=1.0)
    assert bar.enabled is False
    bar.update(1, loss=1.0)
    bar.close()


@pytest.mark.parametrize("kwargs", [{"total": -1}, {"total": 2.5}, {"total": True}, {"min_interval": -0.1},
                                    {"min_interval": float("nan")}])
def test_invalid_arguments(kwargs):
    args = {"total": 10, "desc": "x", "stream": io.StringIO()}
    args.update(kwargs)
    with pytest.raises(ValueError):
        ProgressBar(**args)


def test_formatting_helpers():
    assert progress.format_value(0.41234) == "0.4123"
    assert progress.format_value(0.0) == "0.0000"
    assert progress.format_value(2e-5) == "2.000e-05"
    assert progress.format_value(123456.0) == "1.235e+05"
    assert progress.format_value(float("nan")) == "nan"
    assert progress.format_duration(12) == "0:00:12"
    assert progress.format_duration(3725) == "1:02:05"
    assert progress.format_duration(float("inf")) == "?"
