"""Training reports: a console progress bar, a metrics log (JSON, checkpoints) and PNG plots.

- :class:`ProgressBar` (:mod:`.progress`): one rate-limited ``\\r`` line per epoch, auto-disabled
  off a TTY or with ``DISTILLX_QUIET=1``.
- :class:`MetricsLog` (:mod:`.metrics`): per-epoch/per-step records, ``save_json`` (atomic),
  ``load_json``, ``state_dict``/``load_state_dict``.
- :func:`plot_metrics` (:mod:`.plot`): losses and validation accuracy per phase to a PNG; needs the
  optional matplotlib (``pip install distillx[plot]``), imported only when called.
"""
from .metrics import MetricsLog
from .plot import plot_metrics
from .progress import ProgressBar

__all__ = ["MetricsLog", "ProgressBar", "plot_metrics"]
