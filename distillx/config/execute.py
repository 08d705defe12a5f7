"""Run a resolved config (:mod:`distillx.config`): build the data, models and Distiller, train the
teacher and the student, and write ``checkpoint.pt``, ``config.json``, ``metrics.json``,
``metrics.png``, ``student.pt`` (or ``student/`` for a Hugging Face student, with ``save_pretrained``
and the tokenizer), ``teacher.pt`` (and ``composed.pt`` for a student on the teacher's features) into
``output_dir``; the command is ``distillx run`` (:mod:`distillx.cli.run`).

Under ``torchrun`` every process runs this. First every rank checks that all run the same resolved
config (:data:`PER_PROCESS` aside) and the same ``--resume``/``--overwrite``; then rank 0 alone checks
and writes ``output_dir`` (the others wait for its verdict and stop with it) and prints, the others
stay quiet.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any, Optional

import torch

from .._atomic import atomic_open, save_atomic
from ..compose import save_composed
from ..engine import checkpoint as ckpt
from ..engine.distributed import RanksDisagree, check_same, flatten, init_from_env
from ..engine.fsdp import full_state_dict
from ..engine.loop import TrainingInterrupted
from ..engine.step import NonFiniteLossError
from ..hf.pretrained import is_pretrained
from .build import _message, build
from .outputs import LOGS_DIR, MANIFEST, OUTPUTS, STUDENT_DIR, Outputs, inputs_of
from .schema import ConfigError

PROG = "distillx run"


#: Keys each process may set for itself: they change no collective and no result.
PER_PROCESS = ("threads", "training.progress")


class StoppedByRankZero(ConfigError):
    """Raised on the other ranks when rank 0 refused the run (rank 0 printed why)."""


# -- running -------------------------------------------------------------------------------------
def config_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every leaf that differs between two resolved configs."""
    a, b = flatten(old), flatten(new)
    changes = []
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b or a[k] != b[k]:
            before = repr(a[k]) if k in a else "(unset)"
            after = repr(b[k]) if k in b else "(unset)"
            changes.append(f"{k}: {before} -> {after}")
    return changes


_TEMPORARY = re.compile(r"^\.(%s)\.[0-9a-f]{12}\.tmp$|^\.distillx-write-test$" % "|".join(map(re.escape, (*OUTPUTS, MANIFEST))))


def _same_config(path: str, cfg: dict) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f) == json.loads(json.dumps(cfg, default=str))
    except (OSError, ValueError):
        return False


def check_output_dir(out: str, cfg: dict) -> None:
    """A fresh run (no --resume, no --overwrite) writes only into an ``output_dir`` that is missing,
    empty (temporary files of an interrupted write aside), or holds a distillx run of this very
    config that stopped before its first checkpoint (its ``config.json`` equals the resolved config);
    anything else is a :class:`ConfigError` naming what is there."""
    if not os.path.isdir(out):
        if os.path.exists(out):
            raise ConfigError(f"output_dir {out!r} is a file, not a directory")
        return
    entries = sorted(e for e in os.listdir(out) if not _TEMPORARY.match(e))
    if not entries or _same_config(os.path.join(out, "config.json"), cfg):
        return
    ours = [e for e in entries if e in OUTPUTS or e == MANIFEST]
    shown = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
    replaced = f"; a run would replace {', '.join(ours)}" if ours else ""
    why = ("its config.json is not this run's config" if "config.json" in entries
           else "it holds no distillx run")
    raise ConfigError(f"output_dir {out!r} is not empty ({shown}) and {why}{replaced}. Choose another output_dir "
                      "(--set output_dir=...), or pass --overwrite to replace distillx's outputs there "
                      f"(what its {MANIFEST} lists; other files are left alone)")


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
    ctx = init_from_env(torch.device(cfg["device"]))
    shared = {k: v for k, v in flatten(json.loads(json.dumps(cfg, default=str))).items() if k not in PER_PROCESS}
    try:  # before any other collective: ranks that disagree would hang in the first one that differs
        check_same(ctx, {**shared, "--resume": resume, "--overwrite": overwrite}, "the run's config")
    except RanksDisagree as exc:
        raise ConfigError(str(exc)) from None
    problem = None
    finished = False
    if ctx.is_main:
        try:
            finished = _prepare_output_dir(cfg, resume, overwrite)
        except ConfigError as exc:
            problem = exc
    if ctx.any(problem is not None):  # every rank stops with rank 0's verdict
        raise problem if problem is not None else StoppedByRankZero("rank 0 refused the run")
    finished = bool(ctx.gather(finished)[0])
    return _run(cfg, source, resume, overwrite, progress, command, finished, ctx)


def _prepare_output_dir(cfg: dict, resume: bool, overwrite: bool) -> bool:
    """Check ``output_dir`` for this run (rank 0); True when the checkpoint to resume has finished."""
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
    elif not overwrite:
        check_output_dir(out, cfg)
    return finished


def _run(cfg: dict, source: str, resume: bool, overwrite: bool, progress: Optional[bool], command: str,
         finished: bool, ctx) -> int:
    out = cfg["output_dir"]
    path = {name: os.path.join(out, name) for name in OUTPUTS}
    note = _note if ctx.is_main else (lambda text: None)
    threads = torch.get_num_threads()
    try:
        if cfg["threads"] is not None:
            torch.set_num_threads(cfg["threads"])
        # A private copy of the global CPU generator: main() called in-process leaves the caller's as it was.
        with torch.random.fork_rng(devices=[]):
            run = build(cfg, progress if ctx.is_main else False)  # seeds torch first
            d = run.distiller
            try:
                outputs = Outputs(out, ()) if ctx.is_main else None
                record = outputs.record if outputs is not None else (lambda *names: None)
                try:
                    if ctx.is_main:
                        os.makedirs(out, exist_ok=True)
                        if overwrite and not resume:
                            # Now that the models and data are loaded: the previous run's outputs
                            # go, except what this run reads (they stay until it replaces them).
                            outputs.remove_previous(keep=inputs_of(cfg))
                        else:
                            outputs = Outputs.resume(out)
                            record = outputs.record
                        record("config.json", "checkpoint.pt")
                        write_json(cfg, path["config.json"])
                except OSError as exc:
                    raise ConfigError(f"output_dir {out!r} cannot be written: {exc}") from exc
                if finished:
                    note(f"the checkpoint has finished all {cfg['student']['epochs']} student epochs: nothing left "
                          "to train (raise student.epochs to train on); writing the outputs again")
                start = time.perf_counter()
                logs_before = outputs.snapshot(LOGS_DIR) if outputs is not None else {}
                try:
                    try:
                        d.fit(run.train, cfg["student"]["epochs"], run.val, teacher_epochs=cfg["teacher"]["epochs"],
                              resume=True if resume else None)
                    finally:  # event files are named when first written: list them after, stopped or not
                        if outputs is not None:
                            outputs.record_written(LOGS_DIR, logs_before)
                except NonFiniteLossError as exc:
                    record("metrics.json")
                    d.save_metrics(path["metrics.json"])
                    note(f"{exc}\n{PROG}: the metrics up to this point are in {path['metrics.json']}")
                    return 3
                except TrainingInterrupted as exc:
                    record("metrics.json")
                    d.save_metrics(path["metrics.json"])
                    note(f"{exc}; continue with: {command} --resume")
                    return 130
                except ckpt.CheckpointError as exc:
                    raise ConfigError(f"--resume: {exc}") from exc
                except (ValueError, TypeError, KeyError) as exc:
                    raise ConfigError(_message(exc)) from exc
                seconds = time.perf_counter() - start
                written = ["checkpoint.pt", "config.json"]
                if outputs is not None and outputs.snapshot(LOGS_DIR):
                    written.append(LOGS_DIR + "/")
                if is_pretrained(run.student):  # AutoModel.from_pretrained(output_dir/student) loads it
                    before = outputs.snapshot(STUDENT_DIR) if outputs is not None else {}
                    d.save_student(os.path.join(out, STUDENT_DIR), run.tokenizer)
                    if outputs is not None:  # names known only once written
                        outputs.record_written(STUDENT_DIR, before)
                    written.append(STUDENT_DIR + "/")
                else:
                    student_state = full_state_dict(run.student)  # every rank: gathers a sharded student
                    if ctx.is_main:
                        record("student.pt")
                        save_atomic(student_state, path["student.pt"])
                    written.append("student.pt")
                if ctx.is_main:
                    if cfg["teacher"]["epochs"] > 0:
                        record("teacher.pt")
                        save_atomic(full_state_dict(run.teacher), path["teacher.pt"])
                        written.append("teacher.pt")
                    if d.composed is not None:
                        record("composed.pt")
                        save_composed(d.composed, path["composed.pt"])
                        written.append("composed.pt")
                record("metrics.json", "metrics.png")
                d.save_metrics(path["metrics.json"])
                written.append("metrics.json")
                try:
                    d.plot(path["metrics.png"])
                    written.append("metrics.png")
                except ImportError as exc:  # matplotlib is optional
                    note(f"metrics.png not written: {exc}")
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

    if not ctx.is_main:
        return 0
    t_note = (f"trained {cfg['teacher']['epochs']} epochs" if cfg["teacher"]["epochs"]
              else "loaded from teacher.checkpoint" if cfg["teacher"]["checkpoint"] else "untrained, as built")
    val_note = "val accuracy" if run.val is not None else "val accuracy (no val loader)"
    print(f"{PROG}: {source} -> {out} ({seconds:.1f} s of training)")
    print(f"  teacher  {params(run.teacher):>9,} params  {val_note} {_percent(teacher_acc)}  ({t_note})")
    print(f"  student  {params(run.student):>9,} params  {val_note} {_percent(student_acc)}  "
          f"({cfg['student']['epochs']} epochs, methods: {', '.join(m['name'] for m in cfg['methods']) or 'none'})")
    print(f"  wrote {', '.join(os.path.join(out, n) for n in written)}")
    return 0


