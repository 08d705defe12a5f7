"""A one-line, rate-limited progress bar for training epochs (pure Python, no tqdm).

    bar = ProgressBar(total=len(loader), desc="student 3/20")
    for inputs, targets in loader:
        losses = step(inputs, targets)
        bar.update(len(targets), loss=losses["loss"], task=losses["task"], kd=losses["kd"])
    bar.close(val_accuracy=0.8123)

draws, on one line rewritten with ``\\r``::

    student 3/20   37/120 [######..............]  loss 0.4123  task 0.2012  kd 0.2111  1234 samples/s  eta 0:00:12

Each redraw is ``\r`` + the line + spaces over whatever a longer previous line left, cut to the
terminal width (``COLUMNS``, else the stream's terminal, else 80) minus one column: when it does
not fit, the bar shrinks or goes first, then the values are cut short; desc, count, throughput
and eta stay. :meth:`~ProgressBar.close` writes the full final line (``in H:MM:SS`` instead of
the eta, plus its ``final`` values) and a newline; it is never cut, as it is not redrawn.

``total`` counts *steps* (calls to :meth:`ProgressBar.update`, i.e. batches: ``len(loader)``);
``None`` when unknown (no bar, no eta). Components are shown as per-sample running means over the
bar's lifetime (each step weighted by its ``n_samples``, like the epoch averages of
:func:`distillx.engine.training.run_epochs`); throughput is samples per second since the bar was created.

Cost: a disabled bar returns from :meth:`~ProgressBar.update` at once. An enabled one does a little
float arithmetic per step and redraws at most once per ``min_interval`` seconds. Components may be
floats or 0-d tensors; tensors are accumulated on their device (``detach() * n``) and converted
with ``float()`` (one synchronisation) only when a line is drawn, so passing the step's loss tensors
does not add a device sync per step.

Auto-enable (``enabled=None``): on only when ``stream.isatty()`` and ``DISTILLX_QUIET`` is unset or
false (``""``, ``0``, ``false``, ``no``, ``off``; anything else, e.g. ``1``, silences it). So logs
redirected to a file or a CI console get no ``\\r`` noise. ``enabled=True``/``False`` overrides both.
A write error on the stream (closed pipe) disables the bar instead of stopping training.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from typing import Any, Optional, TextIO

from .. import _checks

__all__ = ["ProgressBar", "quiet_from_env", "format_value", "format_duration"]

QUIET_ENV = "DISTILLX_QUIET"
_FALSE = {"", "0", "false", "no", "off"}
BAR_WIDTH = 20  # characters inside the [...]; shrinks (down to none) on narrow terminals
_now = time.monotonic  # module-level so tests can substitute a fake clock


def quiet_from_env() -> bool:
    """True when ``DISTILLX_QUIET`` is set to a true value (anything but "", 0, false, no, off)."""
    value = os.environ.get(QUIET_ENV)
    return value is not None and value.strip().lower() not in _FALSE


def format_value(value: float) -> str:
    """``0.4123``-style for ordinary magnitudes, ``1.234e+05``/``2.000e-05`` otherwise, ``nan``/``inf`` as is."""
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.3e}"


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``0:00:12``); ``?`` for a non-finite or negative duration."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _terminal_width(stream: Any) -> int:
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation (StringIO) is both
        return shutil.get_terminal_size((80, 24)).columns


class ProgressBar:
    """One progress line per epoch; see the module docstring.

    Args:
        total: number of steps (batches) expected, or None when unknown.
        desc: label at the start of the line, e.g. ``"student 3/20"``.
        stream: where to draw; default ``sys.stderr`` (looked up when the bar is created, so a
            redirected/captured stderr is honoured).
        enabled: True/False to force; None (default) for auto (TTY and not ``DISTILLX_QUIET``).
        min_interval: minimum seconds between redraws (0 redraws on every update).

    Attributes (maintained only while enabled): ``steps``, ``n_samples``, :attr:`means`,
    :attr:`rate`, :attr:`elapsed`; ``redraws`` counts lines drawn.
    """

    def __init__(self, total: Optional[int], desc: str = "", stream: Optional[TextIO] = None,
                 enabled: Optional[bool] = None, min_interval: float = 0.1):
        _checks.integer("total", total, ge=0, optional=True)
        _checks.number("min_interval", min_interval, ge=0)
        self.total = total
        self.desc = str(desc)
        self.stream = sys.stderr if stream is None else stream
        self.min_interval = float(min_interval)
        if enabled is None:
            enabled = _is_tty(self.stream) and not quiet_from_env()
        self.enabled = bool(enabled)
        self.closed = False
        self.steps = 0
        self.n_samples = 0
        self.redraws = 0
        self._sums: dict[str, Any] = {}
        self._start = _now()
        self._last_draw = -math.inf
        self._last_len = 0

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- public API ------------------------------------------------------------------------------
    def update(self, n_samples: int, **components: Any) -> None:
        """Record one step of ``n_samples`` samples and its loss ``components`` (floats or 0-d tensors).

        Redraws the line when at least ``min_interval`` seconds have passed since the last redraw.
        A no-op when the bar is disabled or closed.
        """
        if not self.enabled or self.closed:
            return
        n = int(n_samples)
        self.steps += 1
        self.n_samples += n
        sums = self._sums
        for name, value in components.items():
            detach = getattr(value, "detach", None)
            term = (detach() if detach is not None else float(value)) * n
            sums[name] = sums[name] + term if name in sums else term
        now = _now()
        if now - self._last_draw >= self.min_interval:
            self._last_draw = now
            self._draw(self._line(now, final={}, done=False), end="")

    def close(self, **final: Any) -> None:
        """Draw the final line (with ``final`` values, e.g. ``val_accuracy=0.81``, appended) and a newline.

        Idempotent; prints nothing when disabled.
        """
        if self.closed:
            return
        self.closed = True
        if self.enabled:
            self._draw(self._line(_now(), final=final, done=True), end="\n")
            self._flush()

    @property
    def means(self) -> dict[str, float]:
        """Per-sample running mean of each component (converted to float: syncs when tensors were given)."""
        if self.n_samples == 0:
            return {name: math.nan for name in self._sums}
        return {name: float(s) / self.n_samples for name, s in self._sums.items()}

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was created."""
        return _now() - self._start

    @property
    def rate(self) -> float:
        """Samples per second since the bar was created (0 before any time has passed)."""
        elapsed = self.elapsed
        return self.n_samples / elapsed if elapsed > 0 else 0.0

    # -- drawing ---------------------------------------------------------------------------------
    def _line(self, now: float, final: dict[str, Any], done: bool) -> str:
        elapsed = now - self._start
        width = _terminal_width(self.stream) - 1  # never touch the last column: some terminals wrap
        parts = [self.desc] if self.desc else []
        if self.total is not None:
            count = f"{self.steps:>{len(str(self.total))}}/{self.total}"
        else:
            count = f"{self.steps} steps"
        values = [f"{name} {format_value(v)}" for name, v in self.means.items()]
        values += [f"{name} {_format_final(v)}" for name, v in final.items()]
        rate = self.n_samples / elapsed if elapsed > 0 else 0.0
        timing = [f"{rate:.0f} samples/s" if rate >= 100 else f"{rate:.1f} samples/s"]
        if done:
            timing.append(f"in {format_duration(elapsed)}")
        elif self.total is not None and self.steps > 0:
            timing.append(f"eta {format_duration(elapsed / self.steps * max(self.total - self.steps, 0))}")
        head = "  ".join(parts + [count])
        middle = "  ".join(values)
        end = "  ".join(timing)
        # Too wide for the terminal: first the bar shrinks (and goes), then the values are cut
        # (desc, count, throughput and eta stay), and only then the line itself is cut. The final
        # line is never cut: it is not redrawn, so wrapping is harmless and nothing is lost.
        room = width - len(head) - len(end) - (len(middle) + 2 if middle else 0) - 2
        if self.total is not None and min(BAR_WIDTH, room - 3) >= 5:
            bar_width = min(BAR_WIDTH, room - 3)  # " [" + "]"
            frac = 1.0 if self.total == 0 else min(self.steps / self.total, 1.0)
            filled = int(bar_width * frac)
            head += " [" + "#" * filled + "." * (bar_width - filled) + "]"
        if middle and not done:
            room = width - len(head) - len(end) - 4
            if len(middle) > room:
                middle = middle[:room - 3].rstrip() + "..." if room >= 8 else ""
        line = "  ".join(x for x in (head, middle, end) if x)
        return line if done or width <= 0 else line[:width]

    def _draw(self, line: str, end: str) -> None:
        pad = max(self._last_len - len(line), 0)  # blank out what a longer previous line left behind
        self._write("\r" + line + " " * pad + end)
        self._last_len = 0 if end else len(line)
        self.redraws += 1
        if not end:
            self._flush()

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
        except (OSError, ValueError):  # broken pipe, closed stream: stop reporting, keep training
            self.enabled = False

    def _flush(self) -> None:
        try:
            self.stream.flush()
        except (AttributeError, OSError, ValueError):
            self.enabled = False


def _format_final(value: Any) -> str:
    if isinstance(value, (bool, str)) or value is None:
        return str(value)
    if not isinstance(value, (int, float)):
        try:
            value = float(value)  # 0-d tensors, numpy scalars
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, int):
        return str(value)
    return format_value(value)
