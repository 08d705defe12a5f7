"""What ``distillx run`` wrote into ``output_dir``: the ``distillx-outputs.json`` manifest.

A run records every output *before* writing it (a file named there may be missing, never the
other way round), so ``--overwrite`` knows exactly which files are distillx's: it deletes those
and nothing else. What it will delete is limited twice over: only names of the run's own outputs
(``OUTPUTS``) or files inside the Hugging Face student folder ``student/`` or the TensorBoard
folder ``tensorboard/`` (event files are listed after the training that wrote them), resolved inside
``output_dir``; and never a file the new run reads (a path in its config, e.g.
``teacher.checkpoint = "<output_dir>/teacher.pt"``), which stays until the new run replaces it.
A folder without a manifest (a run of an older distillx, or files of the user's own) has nothing
deleted: the new run only replaces the files it writes.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable

from .._atomic import atomic_open

MANIFEST = "distillx-outputs.json"
FORMAT = "distillx.run-outputs"
OUTPUTS = ("checkpoint.pt", "config.json", "metrics.json", "metrics.png", "student.pt", "teacher.pt", "composed.pt")
STUDENT_DIR = "student"  # a Hugging Face student's save_pretrained directory
LOGS_DIR = "tensorboard"  # the "tensorboard" logger's event files (distillx.loggers.tensorboard.SUBDIR)
FOLDERS = (STUDENT_DIR, LOGS_DIR)  # folders whose files are listed once written (their names are not known before)


def _safe(out: str, name: Any) -> bool:
    """Whether ``name`` from a manifest may name a distillx output: an output name, or a relative
    path inside ``student/`` or ``tensorboard/`` that stays there once resolved."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        return False
    if name in OUTPUTS:
        return True
    target = os.path.realpath(os.path.join(out, name))
    return any(name.startswith(folder + "/") and target.startswith(os.path.realpath(os.path.join(out, folder)) + os.sep)
               for folder in FOLDERS)


def listed(out: str) -> list[str]:
    """The files a previous run's manifest lists, those that pass the checks above (a missing,
    unreadable or foreign manifest lists nothing)."""
    try:
        with open(os.path.join(out, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), list):
        return []
    return [name for name in manifest["files"] if _safe(out, name)]


def inputs_of(cfg: Any) -> list[str]:
    """Every existing file or folder a resolved config names (real paths), ``output_dir`` and the
    folders above it aside: what a run may read."""
    if isinstance(cfg, dict) and isinstance(cfg.get("output_dir"), str):
        out = os.path.realpath(cfg["output_dir"])
        found = [p for k, v in cfg.items() if k != "output_dir" for p in inputs_of(v)]
        return [p for p in found if not (out == p or out.startswith(p.rstrip(os.sep) + os.sep))]
    if isinstance(cfg, dict):
        return [p for v in cfg.values() for p in inputs_of(v)]
    if isinstance(cfg, list):
        return [p for v in cfg for p in inputs_of(v)]
    if isinstance(cfg, str) and cfg and os.path.exists(cfg):
        return [os.path.realpath(cfg)]
    return []


class Outputs:
    """The manifest of one run in ``out``: :meth:`record` before writing, :meth:`remove_previous` on
    ``--overwrite``. Only the process that writes outputs (rank 0) makes one."""

    def __init__(self, out: str, previous: Iterable[str] = ()):
        self.out = out
        self.files: list[str] = list(dict.fromkeys(previous))

    @classmethod
    def resume(cls, out: str) -> "Outputs":
        """A resumed run keeps what the manifest lists and adds to it."""
        return cls(out, listed(out))

    def remove_previous(self, keep: Iterable[str]) -> list[str]:
        """Delete the files the previous run's manifest lists, except those under a path in
        ``keep`` (real paths the new run reads); those stay listed. Returns what was deleted."""
        keep = [os.path.realpath(k) for k in keep]
        removed = []
        for name in listed(self.out):
            path = os.path.join(self.out, name)
            real = os.path.realpath(path)
            if any(real == k or real.startswith(k.rstrip(os.sep) + os.sep) for k in keep):
                self.files.append(name)
                continue
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
                removed.append(name)
        for name in removed:  # the folders save_pretrained made, once empty (a user's file keeps them)
            parent = os.path.dirname(name)
            while parent:
                try:
                    os.rmdir(os.path.join(self.out, parent))
                except OSError:
                    break
                parent = os.path.dirname(parent)
        self.files = list(dict.fromkeys(self.files))
        self._write()
        return removed

    def record(self, *names: str) -> None:
        """Add ``names`` (relative to ``out``) and write the manifest atomically."""
        new = [n for n in names if n not in self.files]
        if new:
            self.files += new
            self._write()

    def _write(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        with atomic_open(os.path.join(self.out, MANIFEST)) as f:
            json.dump({"format": FORMAT, "version": 1, "files": self.files}, f, indent=2)
            f.write("\n")

    def snapshot(self, folder: str) -> dict[str, int]:
        """The files under ``folder`` (relative to ``out``) with their modification times."""
        found = {}
        for root, _, files in os.walk(os.path.join(self.out, folder)):
            for f in files:
                path = os.path.join(root, f)
                found[os.path.relpath(path, self.out).replace(os.sep, "/")] = os.stat(path).st_mtime_ns
        return found

    def record_written(self, folder: str, before: dict[str, int]) -> None:
        """Add the files under ``folder`` that are new or changed since :meth:`snapshot` ``before``
        (what ``save_pretrained`` wrote; a file of the user's there stays unlisted)."""
        self.record(*sorted(n for n, t in self.snapshot(folder).items() if before.get(n) != t))
