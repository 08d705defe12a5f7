"""Plot a :class:`~distillx.reporting.MetricsLog` to a PNG (needs matplotlib: ``pip install distillx[plot]``).

    plot_metrics(log, "runs/metrics.png")

The figure has one column per phase present (``teacher`` first, then ``student``, then any other
phase in logging order) and two rows: the per-epoch training loss components (``loss``, ``task``
and one line per method: every numeric epoch value except ``val_*``, the balance factors and
bookkeeping such as ``lr``/``time``) and the per-epoch validation accuracy (``val_accuracy``). A log
with balance factors (``weight/<term>``, ``Distiller(balance="auto")``) gets a third row: each
term's factor, its epoch mean; one with a method's own statistics (``<method>/<name>``, such as
``gkd/on_policy``) a row of those. A phase without
validation accuracy gets a panel saying so. Non-finite values (a diverged loss) are left as gaps,
and epochs with a non-finite loss component are marked by a dotted red vertical line.
The loss axis switches to a log scale when all values are positive and span more than two decades
(e.g. ``at`` with weight 1000 next to ``kd``).

matplotlib is imported only inside :func:`plot_metrics`, and only its object-oriented API with the
Agg canvas is used: the caller's pyplot backend and global state are not touched, and importing
distillx does not import matplotlib.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Optional, Union

from .._atomic import PathLike, atomic_open
from .metrics import WEIGHT_PREFIX, MetricsLog

__all__ = ["plot_metrics", "INSTALL_HINT"]

INSTALL_HINT = "pip install matplotlib (or pip install distillx[plot])"
PHASE_ORDER = ("teacher", "student")
# numeric epoch values that are not loss components
NOT_LOSSES = frozenset({"epoch", "step", "lr", "learning_rate", "time", "elapsed", "seconds", "duration",
                        "samples", "n_samples", "throughput", "samples_per_s", "samples_per_sec"})
ACCURACY = "val_accuracy"


def _import_matplotlib():
    try:
        import matplotlib  # noqa: F401  (fails first, also when a submodule is cached but matplotlib is blocked)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as err:
        raise ImportError(f"plot_metrics needs matplotlib, which is not installed or failed to import ({err}); "
                          f"{INSTALL_HINT}") from err
    return Figure, FigureCanvasAgg, MaxNLocator


def _as_log(log_or_dict: Union[MetricsLog, dict]) -> MetricsLog:
    if isinstance(log_or_dict, MetricsLog):
        return log_or_dict
    if isinstance(log_or_dict, dict):
        return MetricsLog.from_dict(log_or_dict, keep_steps=False)
    raise TypeError(f"plot_metrics needs a MetricsLog or its to_dict()/state_dict() form, "
                    f"got {type(log_or_dict).__name__}")


def _number(value: Any) -> Optional[float]:
    """A float for plotting (non-finite -> nan, a gap), or None when ``value`` is not numeric."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else math.nan


def _nonfinite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _ordered_phases(log: MetricsLog) -> list[str]:
    present = [r["phase"] for r in log.epochs()]
    seen = list(dict.fromkeys(present))
    return [p for p in PHASE_ORDER if p in seen] + [p for p in seen if p not in PHASE_ORDER]


def _components(records: list[dict], components: Optional[Sequence[str]]) -> list[str]:
    if components is not None:
        return [c for c in components if any(_number(r.get(c)) is not None for r in records)]
    names: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if (k != "phase" and k not in NOT_LOSSES and not k.startswith("val_") and "/" not in k
                    and _number(v) is not None):
                names.setdefault(k, None)
    first = [k for k in ("loss", "task") if k in names]
    return first + [k for k in names if k not in first]


def _factor_keys(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in records for k in r if k.startswith(WEIGHT_PREFIX)))


def _statistic_keys(records: list[dict]) -> list[str]:
    """A method's statistics: ``<method key>/<name>`` (``gkd/on_policy``), balance factors aside."""
    return list(dict.fromkeys(k for r in records for k in r
                              if "/" in k and not k.startswith(("val_", WEIGHT_PREFIX)) and _number(r[k]) is not None))


def _plot_factors(ax, records: list[dict], keys: list[str], phase: str, MaxNLocator) -> None:
    """The balance factors of a phase (epoch means), or a panel saying it has none."""
    _plot_lines(ax, records, keys, MaxNLocator, "no balance factors logged", WEIGHT_PREFIX)
    ax.set_title(f"{phase}: balance factors (balance='auto')")
    ax.set_ylabel("factor on the term's weight")


def _plot_statistics(ax, records: list[dict], keys: list[str], phase: str, MaxNLocator) -> None:
    """The methods' own epoch statistics (on-policy share, sampled length, ...), log scale when
    they span more than two decades."""
    _plot_lines(ax, records, keys, MaxNLocator, "no method statistics logged")
    values = [y for k in keys for y in _series(records, k)[1] if not math.isnan(y)]
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.set_title(f"{phase}: method statistics")
    ax.set_ylabel("epoch mean")


def _plot_lines(ax, records: list[dict], keys: list[str], MaxNLocator, empty: str, strip: str = "") -> None:
    for key in keys:
        xs, ys = _series(records, key)
        ax.plot(xs, ys, marker="o", markersize=3, label=key[len(strip):])
    if not keys:
        _empty(ax, empty)
    else:
        ax.legend(loc="best", fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    ax.set_xlabel("epoch")


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        y = _number(r.get(key))
        if y is not None:
            xs.append(r["epoch"])
            ys.append(y)
    return xs, ys


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_metrics(log_or_dict: Union[MetricsLog, dict], path: PathLike, *,
                 components: Optional[Sequence[str]] = None, title: Optional[str] = None,
                 dpi: int = 100) -> str:
    """Write a PNG of the per-epoch losses and validation accuracy of each phase; return ``path``.

    Args:
        log_or_dict: a :class:`MetricsLog` or its :meth:`~MetricsLog.to_dict`/``state_dict()`` form.
        path: where to write the PNG (atomically: temp file in the same folder, then ``os.replace``).
        components: the loss keys to draw (default: every numeric non-``val_*`` epoch value, ``loss``
            and ``task`` first).
        title: figure title (default "distillx training metrics").
        dpi: resolution.

    Raises:
        ImportError: matplotlib is missing (the message says how to install it).
        ValueError: the log holds no epoch records.
    """
    Figure, FigureCanvasAgg, MaxNLocator = _import_matplotlib()
    log = _as_log(log_or_dict)
    phases = _ordered_phases(log)
    if not phases:
        raise ValueError("the metrics log has no epoch records: nothing to plot")

    factors = {p: _factor_keys(log.epochs(p)) for p in phases}
    statistics = {p: _statistic_keys(log.epochs(p)) for p in phases}
    extra = [(name, keys) for name, keys in (("factors", factors), ("statistics", statistics)) if any(keys.values())]
    rows = 2 + len(extra)
    fig = Figure(figsize=(6.0 * len(phases), 4.0 * rows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, len(phases), squeeze=False)
    for col, phase in enumerate(phases):
        records = sorted(log.epochs(phase), key=lambda r: r["epoch"])
        ax = axes[0][col]
        names = _components(records, components)
        finite: list[float] = []
        for name in names:
            xs, ys = _series(records, name)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
            finite += [y for y in ys if not math.isnan(y)]
        bad = sorted({r["epoch"] for r in records for n in names if _nonfinite(r.get(n))})
        for i, epoch in enumerate(bad):  # a diverged epoch is a gap in the lines: mark it
            ax.axvline(epoch, color="tab:red", linestyle=":", linewidth=1.2,
                       label="non-finite loss" if i == 0 else None)
        if not names:
            _empty(ax, "no loss values logged")
        else:
            if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
                ax.set_yscale("log")
            ax.legend(loc="best", fontsize="small")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
        ax.set_title(f"{phase}: training losses")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (mean per sample)")

        ax = axes[1][col]
        xs, ys = _series(records, ACCURACY)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, color="tab:green", label=ACCURACY)
            best = max(range(len(ys)), key=lambda i: -math.inf if math.isnan(ys[i]) else ys[i])
            if not math.isnan(ys[best]):
                ax.annotate(f"best {ys[best]:.4f}", (xs[best], ys[best]), textcoords="offset points",
                            xytext=(0, -14), ha="center", fontsize="small")
            ax.legend(loc="best", fontsize="small")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
        else:
            _empty(ax, "no validation accuracy logged")
        ax.set_title(f"{phase}: validation accuracy")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        for row, (name, keys) in enumerate(extra, start=2):
            draw = _plot_factors if name == "factors" else _plot_statistics
            draw(axes[row][col], records, keys[phase], phase, MaxNLocator)
    fig.suptitle(title if title is not None else "distillx training metrics")

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return os.fspath(path)
