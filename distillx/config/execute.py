"""Run a resolved config (:mod:`distillx.config`): build the data, models and Distiller, train the
teacher and the student, and write ``checkpoint.pt``, ``config.json``, ``metrics.json``,
``metrics.png``, ``student.pt`` (or ``student/`` for a Hugging Face student, with
``save_pretrained`` and the tokenizer) and ``teacher.pt`` into ``output_dir``; the command is
``distillx run`` (:mod:`distillx.cli.run`)."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any, Optional

import torch

from .._atomic import atomic_open, save_atomic
from ..engine import checkpoint as ckpt
from ..engine.loop import TrainingInterrupted
from ..engine.step import NonFiniteLossError
from ..hf.pretrained import is_pretrained
from .build import _message, build
from .schema import ConfigError

PROG = "distillx run"
OUTPUTS = ("checkpoint.pt", "config.json", "metrics.json", "metrics.png", "student.pt", "teacher.pt")
STUDENT_DIR = "student"  # a Hugging Face student's save_pretrained directory


# -- running -------------------------------------------------------------------------------------
def _flatten(value: Any, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out: dict = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    if isinstance(value, list) and value and any(isinstance(v, dict) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: value}


def config_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every leaf that differs between two resolved configs."""
    a, b = _flatten(old), _flatten(new)
    changes = []
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b or a[k] != b[k]:
            before = repr(a[k]) if k in a else "(unset)"
            after = repr(b[k]) if k in b else "(unset)"
            changes.append(f"{k}: {before} -> {after}")
    return changes


def write_json(obj: Any, path: str) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


def _note(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr)


def _percent(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def execute(cfg: dict, source: str, resume: bool, overwrite: bool, progress: Optional[bool],
            command: str = "distillx run CONFIG") -> int:
    """Run a resolved config; return the exit status. ``command`` is how the user ran it (for hints)."""
    out = cfg["output_dir"]
    path = {name: os.path.join(out, name) for name in OUTPUTS}
    finished = False
    if resume:
        if not os.path.isfile(path["checkpoint.pt"]):
            raise ConfigError(f"--resume: there is no checkpoint to continue at {path['checkpoint.pt']!r}; run "
                              "without --resume to start")
        try:
            state = ckpt.load(path["checkpoint.pt"])
        except ckpt.CheckpointError as exc:
            raise ConfigError(f"--resume: {exc}") from None
        finished = state["phase"] == "student" and state["position"]["epoch"] >= cfg["student"]["epochs"] \
            and state["position"]["step"] == 0
        del state
        if os.path.isfile(path["config.json"]):
            try:
                with open(path["config.json"], encoding="utf-8") as f:
                    changes = config_changes(json.load(f), cfg)
            except (OSError, ValueError):
                changes = ["(the previous config.json cannot be read)"]
            if changes:
                _note("note: resuming with a config that differs from the previous run's config.json: "
                      + "; ".join(changes))
    elif os.path.exists(path["checkpoint.pt"]):
        if not overwrite:
            raise ConfigError(f"output_dir {out!r} already holds a run (checkpoint.pt); pass --resume to continue it, "
                              "--overwrite to start again from scratch, or choose another output_dir "
                              "(--set output_dir=...)")
    if overwrite and not resume:
        for name in OUTPUTS:  # so a new run that fails early never sits next to the old run's files
            if os.path.isfile(path[name]):
                os.unlink(path[name])
        if os.path.isdir(os.path.join(out, STUDENT_DIR)):
            shutil.rmtree(os.path.join(out, STUDENT_DIR))

    threads = torch.get_num_threads()
    try:
        if cfg["threads"] is not None:
            torch.set_num_threads(cfg["threads"])
        # A private copy of the global CPU generator: main() called in-process leaves the caller's as it was.
        with torch.random.fork_rng(devices=[]):
            run = build(cfg, progress)  # seeds torch first
            d = run.distiller
            try:
                os.makedirs(out, exist_ok=True)
                write_json(cfg, path["config.json"])
                if finished:
                    _note(f"the checkpoint has finished all {cfg['student']['epochs']} student epochs: nothing left "
                          "to train (raise student.epochs to train on); writing the outputs again")
                start = time.perf_counter()
                try:
                    d.fit(run.train, cfg["student"]["epochs"], run.val, teacher_epochs=cfg["teacher"]["epochs"],
                          resume=True if resume else None)
                except NonFiniteLossError as exc:
                    d.save_metrics(path["metrics.json"])
                    _note(f"{exc}\n{PROG}: the metrics up to this point are in {path['metrics.json']}")
                    return 3
                except TrainingInterrupted as exc:
                    d.save_metrics(path["metrics.json"])
                    _note(f"{exc}; continue with: {command} --resume")
                    return 130
                except ckpt.CheckpointError as exc:
                    raise ConfigError(f"--resume: {exc}") from exc
                except (ValueError, TypeError, KeyError) as exc:
                    raise ConfigError(_message(exc)) from exc
                seconds = time.perf_counter() - start
                written = ["checkpoint.pt", "config.json"]
                if is_pretrained(run.student):  # AutoModel.from_pretrained(output_dir/student) loads it
                    d.save_student(os.path.join(out, STUDENT_DIR), run.tokenizer)
                    written.append(STUDENT_DIR + "/")
                else:
                    save_atomic({k: v.detach().cpu() for k, v in run.student.state_dict().items()},
                                path["student.pt"])
                    written.append("student.pt")
                if cfg["teacher"]["epochs"] > 0:
                    save_atomic({k: v.detach().cpu() for k, v in run.teacher.state_dict().items()},
                                     path["teacher.pt"])
                    written.append("teacher.pt")
                d.save_metrics(path["metrics.json"])
                written.append("metrics.json")
                try:
                    d.plot(path["metrics.png"])
                    written.append("metrics.png")
                except ImportError as exc:  # matplotlib is optional
                    _note(f"metrics.png not written: {exc}")
                teacher_acc = student_acc = None
                if run.val is not None:
                    teacher_acc = d.evaluate(run.val, model=run.teacher)["accuracy"]
                    student_acc = d.evaluate(run.val)["accuracy"]
            finally:
                d.close()
    finally:
        torch.set_num_threads(threads)

    def params(m):
        return sum(p.numel() for p in m.parameters())

    t_note = (f"trained {cfg['teacher']['epochs']} epochs" if cfg["teacher"]["epochs"]
              else "loaded from teacher.checkpoint" if cfg["teacher"]["checkpoint"] else "untrained, as built")
    val_note = "val accuracy" if run.val is not None else "val accuracy (no val loader)"
    print(f"{PROG}: {source} -> {out} ({seconds:.1f} s of training)")
    print(f"  teacher  {params(run.teacher):>9,} params  {val_note} {_percent(teacher_acc)}  ({t_note})")
    print(f"  student  {params(run.student):>9,} params  {val_note} {_percent(student_acc)}  "
          f"({cfg['student']['epochs']} epochs, methods: {', '.join(m['name'] for m in cfg['methods']) or 'none'})")
    print(f"  wrote {', '.join(os.path.join(out, n) for n in written)}")
    return 0


