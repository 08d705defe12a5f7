"""Atomic checkpoints and the random-number state that exact resumption needs.

A checkpoint is one ``torch.save`` file written to a temporary file in the same directory, flushed
and fsync'ed, then renamed over the target (``os.replace`` is atomic on POSIX and Windows), so a
crash or a second interruption never leaves a half-written checkpoint: the previous one stays.

Exact resume (bitwise on CPU): the checkpoint holds, besides model/optimizer/scheduler/scaler
states, every random generator training draws from — torch's global CPU (and CUDA) generator,
Python's and NumPy's, the augmentation generator and any generator attached to the data loader or
its sampler — both as they were when the epoch started (the loader's shuffle is drawn from them on
its first batch) and as they are at the step the checkpoint was taken.
"""
from __future__ import annotations

import os
import random
import sys
from typing import Any, Iterable, Optional

import torch

FORMAT = "distillx-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match the run; the message says what differs."""


def load(path: str) -> dict:
    """Read a distillx checkpoint; :class:`CheckpointError` for a missing, corrupt or foreign file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path!r} cannot be read ({type(exc).__name__}: {exc}); it may be "
                              "truncated or not a distillx checkpoint") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a distillx checkpoint (no format marker {FORMAT!r})")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {ckpt.get('version')!r}; this distillx "
                              f"reads version {VERSION}")
    return ckpt


def check_state_dict(saved: dict, module: torch.nn.Module, what: str, path: str) -> None:
    """Raise :class:`CheckpointError` naming the keys and shapes that differ between ``saved`` and ``module``."""
    current = module.state_dict()
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    shapes = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
              for k, v in current.items() if k in saved and hasattr(saved[k], "shape")
              and tuple(saved[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"not in the {what}: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    if shapes:
        problems.append("shape mismatch: " + "; ".join(shapes[:8]))
    if problems:
        raise CheckpointError(f"checkpoint {path!r} does not match the {what}: " + " | ".join(problems))


def _numpy_random():
    np = sys.modules.get("numpy")  # only if something imported it: no numpy dependency
    return np.random if np is not None else None


def loader_generators(loader: Any) -> list[torch.Generator]:
    """Generators a DataLoader draws its shuffle (and worker seeds) from, if it has its own."""
    gens = []
    for obj in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in gens):
            gens.append(g)
    return gens


def rng_state(extra: Iterable[torch.Generator] = ()) -> dict:
    """Every generator's state (torch CPU/CUDA, Python, NumPy if imported, and ``extra``)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "extra": [g.get_state() for g in extra]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np_random = _numpy_random()
    if np_random is not None:
        state["numpy"] = np_random.get_state()
    return state


def set_rng_state(state: dict, extra: Iterable[torch.Generator] = ()) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_random = _numpy_random()
    if "numpy" in state and np_random is not None:
        np_random.set_state(state["numpy"])
    extra = list(extra)
    if len(extra) != len(state["extra"]):
        raise CheckpointError(f"the checkpoint saved {len(state['extra'])} data/augmentation generator(s) but this "
                              f"run has {len(extra)}: the data loader or augmentations differ from the saved run")
    for g, s in zip(extra, state["extra"]):
        g.set_state(s)


FILENAME = "checkpoint.pt"  # the one checkpoint of a run, in its checkpoint_dir


def for_resume(resume, checkpoint_dir: Optional[str], want_phase: Optional[str], method_keys: list,
               student: torch.nn.Module, teacher: torch.nn.Module) -> Optional[dict]:
    """The checkpoint ``resume`` names (a path, or True for ``checkpoint_dir``'s), checked against the
    run: phase (when ``want_phase``), methods, and the student's and saved teacher's keys and shapes.
    None when ``resume`` is None/False. ``state["path"]`` is where it was read."""
    if resume is None or resume is False:
        return None
    if resume is True and not checkpoint_dir:
        raise ValueError("resume=True needs checkpoint_dir= (where checkpoint.pt is); or pass the checkpoint path")
    path = os.path.join(checkpoint_dir, FILENAME) if resume is True else resume
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"resume must be a checkpoint path or True, got {type(resume).__name__}")
    state = load(path)
    if want_phase is not None and state["phase"] != want_phase:
        raise CheckpointError(f"checkpoint {path!r} is from the {state['phase']} phase, not the {want_phase} "
                              "phase; resume it with fit(..., resume=...)")
    if state["method_keys"] != list(method_keys):
        raise CheckpointError(f"checkpoint {path!r} was written with methods {state['method_keys']}, this "
                              f"Distiller has {list(method_keys)}")
    check_state_dict(state["student"], student, "student", path)
    if state.get("teacher") is not None:
        check_state_dict(state["teacher"], teacher, "teacher", path)
    state["path"] = path
    return state


def build(phase: str, position: dict, *, student: torch.nn.Module, methods: list, method_keys: list,
          teacher: Optional[torch.nn.Module], optimizer, scheduler, scaler, metrics, history: dict,
          transfer_report: Optional[dict]) -> dict:
    """The checkpoint of a distillation run at ``position`` of ``phase`` (``teacher`` None when its
    weights need not be saved: an untrained teacher is the user's own)."""
    return {
        "format": FORMAT, "version": VERSION, "phase": phase, "position": position,
        "student": student.state_dict(), "methods": [m.state_dict() for m in methods],
        "method_keys": list(method_keys), "teacher": teacher.state_dict() if teacher is not None else None,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
        "scaler": scaler.state_dict() if scaler else None, "metrics": metrics.state_dict(),
        "history": history, "transfer_report": transfer_report,
    }


def restore(state: dict, *, student: torch.nn.Module, teacher: torch.nn.Module, methods: list, method_keys: list,
            metrics, optimizer, scheduler, scaler) -> bool:
    """Load a checkpoint :func:`for_resume` returned into the run's objects; True when it held
    the teacher's weights (a trained teacher)."""
    student.load_state_dict(state["student"])
    if state.get("teacher") is not None:
        teacher.load_state_dict(state["teacher"])
    for key, m, sd in zip(method_keys, methods, state["methods"]):
        try:
            m.load_state_dict(sd)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {state['path']!r}: method {key!r} does not match its saved "
                                  f"state: {exc}") from exc
    metrics.load_state_dict(state["metrics"])
    optimizer.load_state_dict(state["optimizer"])
    for obj, saved, what in ((scheduler, state.get("scheduler"), "scheduler"), (scaler, state.get("scaler"), "scaler")):
        if obj is None:
            continue
        if saved is None:
            raise CheckpointError(f"checkpoint {state['path']!r} has no {what} state but this run uses a {what}")
        obj.load_state_dict(saved)
    return state.get("teacher") is not None
