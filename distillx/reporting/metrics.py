"""A log of training metrics per epoch (and optionally per step), savable as JSON and in checkpoints.

    log = MetricsLog()
    log.log_step("student", epoch=0, step=12, loss=0.41, task=0.20, kd=0.21)
    log.log_epoch("student", 0, loss=0.40, task=0.19, kd=0.21, val_accuracy=0.81, val_loss=0.55)
    log.save_json("runs/metrics.json")                    # atomic
    ckpt["metrics"] = log.state_dict()                     # ... later: log.load_state_dict(ckpt["metrics"])

Records are flat dicts: ``{"phase": "student", "epoch": 0, "loss": ..., ...}`` for epochs and the same
plus ``"step"`` for steps. ``phase`` is a free string; the plots know ``"teacher"`` and ``"student"``.
Logging an epoch that is already logged for that phase replaces the record in place (so a resumed
run that repeats an epoch does not produce duplicates); step records are only appended.

Values: ints, floats, bools, strings and None; 0-d tensors and numpy scalars are converted with
``.item()``. Anything else raises ``TypeError`` when logged, so saving cannot fail later on a value.

Non-finite floats. In memory they stay floats (``epochs()`` returns ``nan``/``inf``). In
:meth:`MetricsLog.to_dict`, :meth:`~MetricsLog.save_json` and :meth:`~MetricsLog.state_dict` they
are written as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (the spelling of Python's
non-standard JSON tokens), so the file is strict JSON (``allow_nan=False``: readable by any parser)
and yet a diverged loss stays distinguishable from a missing one (``null`` would lose NaN vs inf).
:meth:`~MetricsLog.from_dict`/:meth:`~MetricsLog.load_json`/:meth:`~MetricsLog.load_state_dict`
turn exactly those three strings back into floats (a genuine string value spelled that way would be
read as a float too).

The dict form, ``{"format": 1, "epochs": [...], "steps": [...]}``, holds only dicts, lists, strings,
ints, floats, bools and None, so it also loads with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from typing import Any, Optional, Union

from .. import _checks
from .._atomic import PathLike, atomic_open

__all__ = ["MetricsLog", "FORMAT_VERSION", "encode_value", "decode_value"]

FORMAT_VERSION = 1
RESERVED = ("phase", "epoch", "step")
WEIGHT_PREFIX = "weight/"  # a loss term's balance factor: weight/<term> (distillx.engine.balance)
_NONFINITE_TO_STR = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_STR_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

Value = Union[None, bool, int, float, str]


def encode_value(value: Value) -> Value:
    """A non-finite float as ``"NaN"``/``"Infinity"``/``"-Infinity"``; any other value unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return _NONFINITE_TO_STR[repr(value)]
    return value


def decode_value(value: Value) -> Value:
    """The inverse of :func:`encode_value`."""
    if isinstance(value, str) and value in _STR_TO_NONFINITE:
        return _STR_TO_NONFINITE[value]
    return value


def _clean(name: str, value: Any) -> Value:
    """``value`` as a plain JSON-able Python scalar, or ``TypeError`` naming ``name``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)  # 0-d torch tensor, numpy scalar/0-d array
    if callable(item):
        try:
            return _clean(name, item())
        except (TypeError, ValueError, RuntimeError) as err:  # e.g. a tensor with several elements
            raise TypeError(f"metric {name!r} must be a scalar, got {type(value).__name__} ({err})") from None
    raise TypeError(f"metric {name!r} must be an int, float, bool, str, None or a scalar tensor, "
                    f"got {type(value).__name__}")


def _check_index(name: str, value: Any) -> int:
    return _checks.integer(name, value, ge=0)


def _check_phase(phase: Any) -> str:
    if not isinstance(phase, str) or not phase:
        raise ValueError(f"phase must be a non-empty string, e.g. 'teacher' or 'student', got {phase!r}")
    return phase


def _record(values: dict[str, Any]) -> dict[str, Value]:
    out = {}
    for key, value in values.items():
        if key in RESERVED:
            raise ValueError(f"{key!r} is a reserved record key ({', '.join(RESERVED)}); it cannot be a metric name")
        out[key] = _clean(key, value)
    return out


class MetricsLog:
    """Per-epoch (and, with ``keep_steps``, per-step) metric records of one or more training phases.

    Args:
        keep_steps: keep :meth:`log_step` records (default True). With False, :meth:`log_step` is a
            no-op and loaded step records are dropped: only the compact per-epoch history is kept.
    """

    def __init__(self, keep_steps: bool = True):
        self.keep_steps = bool(keep_steps)
        self._epochs: list[dict[str, Value]] = []
        self._steps: list[dict[str, Value]] = []

    def __repr__(self) -> str:
        return (f"MetricsLog(phases={self.phases()!r}, epochs={len(self._epochs)}, steps={len(self._steps)}, "
                f"keep_steps={self.keep_steps})")

    def __len__(self) -> int:
        """The number of epoch records."""
        return len(self._epochs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MetricsLog):
            return NotImplemented
        return self.to_dict() == other.to_dict()  # non-finite floats are strings there, so nan == nan

    # -- logging ---------------------------------------------------------------------------------
    def log_step(self, phase: str, epoch: int, step: int, **values: Any) -> None:
        """Append a step record ``{"phase", "epoch", "step", **values}`` (no-op when ``keep_steps`` is False)."""
        record = {"phase": _check_phase(phase), "epoch": _check_index("epoch", epoch),
                  "step": _check_index("step", step)}
        record.update(_record(values))
        if self.keep_steps:
            self._steps.append(record)

    def log_epoch(self, phase: str, epoch: int, **values: Any) -> None:
        """Record ``{"phase", "epoch", **values}``; replaces an existing record of the same phase and epoch.

        To log a :func:`distillx.engine.training.run_epochs` metrics dict ``m`` (which holds ``"epoch"``):
        ``log.log_epoch(phase, m["epoch"], **{k: v for k, v in m.items() if k != "epoch"})``.
        """
        record = {"phase": _check_phase(phase), "epoch": _check_index("epoch", epoch)}
        record.update(_record(values))
        for i, old in enumerate(self._epochs):
            if old["phase"] == record["phase"] and old["epoch"] == record["epoch"]:
                self._epochs[i] = record
                return
        self._epochs.append(record)

    def clear(self) -> None:
        """Remove every record."""
        self._epochs.clear()
        self._steps.clear()

    # -- reading ---------------------------------------------------------------------------------
    def epochs(self, phase: Optional[str] = None) -> list[dict[str, Value]]:
        """Copies of the epoch records (all phases, or only ``phase``), in logging order."""
        return [dict(r) for r in self._epochs if phase is None or r["phase"] == phase]

    def steps(self, phase: Optional[str] = None, epoch: Optional[int] = None) -> list[dict[str, Value]]:
        """Copies of the step records, optionally only those of ``phase`` and/or ``epoch``."""
        return [dict(r) for r in self._steps
                if (phase is None or r["phase"] == phase) and (epoch is None or r["epoch"] == epoch)]

    def phases(self) -> list[str]:
        """The distinct phases of the epoch and step records, in order of first appearance."""
        seen: dict[str, None] = {}
        for r in self._epochs + self._steps:
            seen.setdefault(r["phase"], None)  # type: ignore[arg-type]
        return list(seen)

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"format": 1, "epochs": [...], "steps": [...]}``, JSON-serialisable (non-finite floats as strings)."""
        def enc(records):
            return [{k: encode_value(v) for k, v in r.items()} for r in records]
        return {"format": FORMAT_VERSION, "epochs": enc(self._epochs), "steps": enc(self._steps)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], keep_steps: bool = True) -> "MetricsLog":
        """A new log from :meth:`to_dict` output (also accepts a :meth:`state_dict`)."""
        log = cls(keep_steps=keep_steps)
        log.load_state_dict(data)
        return log

    def state_dict(self) -> dict[str, Any]:
        """The :meth:`to_dict` form, for a checkpoint (plain containers and scalars only)."""
        return self.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the records with those of ``state`` (validated first: on error the log is unchanged).

        ``keep_steps`` stays as this log was constructed; when False the loaded steps are dropped.
        """
        if not isinstance(state, dict):
            raise TypeError(f"metrics state must be a dict, got {type(state).__name__}")
        fmt = state.get("format")
        if fmt != FORMAT_VERSION:
            raise ValueError(f"unsupported metrics format {fmt!r} (this distillx reads format {FORMAT_VERSION})")
        epochs = self._decode_records(state.get("epochs", []), "epochs", ("phase", "epoch"))
        steps = self._decode_records(state.get("steps", []), "steps", ("phase", "epoch", "step"))
        self._epochs = epochs
        self._steps = steps if self.keep_steps else []

    @staticmethod
    def _decode_records(records: Any, what: str, keys: tuple[str, ...]) -> list[dict[str, Value]]:
        if not isinstance(records, list):
            raise ValueError(f"metrics {what!r} must be a list of records, got {type(records).__name__}")
        out = []
        for i, r in enumerate(records):
            if not isinstance(r, dict) or any(k not in r for k in keys):
                raise ValueError(f"metrics {what}[{i}] must be a dict with keys {', '.join(keys)}, got {r!r}")
            record: dict[str, Value] = {"phase": _check_phase(r["phase"])}
            for k in keys[1:]:
                record[k] = _check_index(f"{what}[{i}].{k}", r[k])
            for k, v in r.items():
                if k not in keys:
                    record[k] = _clean(k, decode_value(v))
            out.append(record)
        return out

    def save_json(self, path: PathLike, indent: Optional[int] = 1) -> str:
        """Write :meth:`to_dict` as strict JSON to ``path`` atomically (temp file in the same folder, then
        ``os.replace``); on any error the previous file is left as it was. Returns ``path``."""
        data = self.to_dict()
        with atomic_open(path, "w") as f:
            json.dump(data, f, allow_nan=False, indent=indent)
            f.write("\n")
        return os.fspath(path)

    @classmethod
    def load_json(cls, path: PathLike, keep_steps: bool = True) -> "MetricsLog":
        """Read a file written by :meth:`save_json`."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return cls.from_dict(data, keep_steps=keep_steps)

