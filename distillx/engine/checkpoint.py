"""Atomic, integrity-checked checkpoints that never run code, and what exact resumption needs.

Writing (:func:`save`): one ``torch.save`` file (a zip archive whose every member carries a CRC-32)
written to a temporary file in the same directory, flushed and fsync'ed, then renamed over the target
(``os.replace`` is atomic on POSIX and Windows), so a crash or a second interruption never leaves a
half-written checkpoint: the previous one stays. A checkpoint holds only tensors and plain Python
values (numbers, strings, lists, tuples, dicts); :func:`build` refuses anything else (a scheduler
whose state holds an object, say) with a ``TypeError`` naming where it is, before training starts.

Reading (:func:`load`): the archive's CRC-32s are verified first (a flipped or zeroed byte anywhere
in the data is an error, not silently corrupt weights or generator states), then the file is read
with ``torch.load(weights_only=True)``: nothing in a checkpoint is executed, so a crafted
``checkpoint.pt`` cannot run code on ``--resume``. Then its structure is checked: a missing key or a
value of the wrong kind is a :class:`CheckpointError` naming the file and the key. Every failure is a
:class:`CheckpointError` naming the file and what is wrong, and the run does not start.

Exact resume (bitwise on CPU): the checkpoint holds, besides model/optimizer/scheduler/scaler
states, every random generator training draws from (:mod:`distillx.engine.rng` says which, and which
loaders are refused because their random state cannot be saved) — both as they were when the epoch
started (the loader's shuffle is drawn from them on its first batch) and as they are at the step the
checkpoint was taken.

A run that differs from the saved one is named before it trains: another optimizer class (the
checkpoint saves ``optimizer_class``; one written before that is checked by the hyperparameters its
state lacks), a train loader with fewer steps per epoch than the saved mid-epoch position (a
:class:`CheckpointError` from the loop), and another number of processes (:func:`check_world_size`:
a warning naming both and what is and is not exact; the run goes on, as a distributed checkpoint
loads at any world size).
"""
from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from typing import Any, Optional

import torch

from .._atomic import atomic_open, save_atomic
from .rng import check_capturable, check_state, loader_generators, rng_state, set_rng_state  # noqa: F401 (API)

FORMAT = "distillx-checkpoint"
VERSION = 2  # 2: random states as tensors and plain values (weights_only), CRC-checked archive
PHASES = ("teacher", "student")
KEYS = ("format", "version", "phase", "position", "student", "methods", "method_keys", "teacher", "optimizer",
        "scheduler", "scaler", "metrics", "history", "transfer_report")
POSITION_KEYS = ("epoch", "step", "epoch_rng", "step_rng", "sums", "n")
BALANCE_KEYS = ("mode", "primary", "every", "factors", "steps")  # engine/balance.Balancer.state_dict()


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match the run; the message says what differs."""


# -- plain values --------------------------------------------------------------------------------
_SCALARS = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device, torch.Size)


def check_plain(obj: Any, where: str) -> None:
    """``TypeError`` naming the first value in ``obj`` that ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, _SCALARS) or type(obj) in (torch.Tensor, torch.nn.Parameter):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_plain(k, f"{where} (a key)")
            check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple, set)) and type(obj) in (list, tuple, set):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"a checkpoint cannot hold {where}: it is a {type(obj).__module__}.{type(obj).__qualname__}. "
                    "distillx checkpoints hold only tensors and plain Python values, so that resuming never runs "
                    "code from a file; give that object a state_dict() of plain values")


# -- reading -------------------------------------------------------------------------------------
def _verify_archive(path: str) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path!r} is corrupt or truncated: not a readable zip archive "
                              f"({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # zlib errors and the like from a damaged member
        raise CheckpointError(f"checkpoint {path!r} is corrupt: {type(exc).__name__}: {exc}") from exc
    if bad is not None:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: the data of {bad!r} fails its CRC-32 check")


def _problem(ckpt: dict) -> Optional[str]:
    """What is missing or malformed in a loaded checkpoint (None when nothing)."""
    missing = [k for k in KEYS if k not in ckpt]
    if missing:
        return f"it is incomplete: missing {', '.join(missing)}"
    if ckpt["phase"] not in PHASES:
        return f"phase is {ckpt['phase']!r}, not one of {PHASES}"
    pos = ckpt["position"]
    if not isinstance(pos, dict):
        return f"position is a {type(pos).__name__}, not a dict"
    missing = [k for k in POSITION_KEYS if k not in pos]
    if missing:
        return f"it is incomplete: missing position.{', position.'.join(missing)}"
    for key in ("epoch", "step", "n"):
        if isinstance(pos[key], bool) or not isinstance(pos[key], int) or pos[key] < 0:
            return f"position.{key} is {pos[key]!r}, not an int >= 0"
    if pos["step"] > 0 and pos["epoch_rng"] is None:
        return "position.epoch_rng is missing for a mid-epoch position"
    for key in ("epoch_rng", "step_rng"):
        if pos[key] is not None or key == "step_rng":
            problem = check_state(pos[key], f"position.{key}")
            if problem:
                return problem
    if pos["sums"] is not None and not (isinstance(pos["sums"], dict)
                                        and all(isinstance(v, float) for v in pos["sums"].values())):
        return "position.sums is not a dict of floats"
    kinds = {"student": dict, "methods": list, "method_keys": list, "optimizer": dict, "metrics": dict,
             "history": dict, "teacher": (dict, type(None))}
    for key, kind in kinds.items():
        if not isinstance(ckpt[key], kind):
            return f"{key} is a {type(ckpt[key]).__name__}"
    if len(ckpt["methods"]) != len(ckpt["method_keys"]):
        return f"it saved {len(ckpt['methods'])} method state(s) for {len(ckpt['method_keys'])} method key(s)"
    if not all(isinstance(ckpt["history"].get(k), list) for k in PHASES):
        return "history lacks the teacher/student lists"
    if not isinstance(ckpt.get("optimizer_class", ""), str):  # absent from checkpoints of older versions
        return f"optimizer_class is {ckpt['optimizer_class']!r}, not a str"
    balance = ckpt.get("balance")  # absent from checkpoints of older versions: no balancing
    if balance is not None and not (isinstance(balance, dict) and all(k in balance for k in BALANCE_KEYS)):
        return f"balance is not a balancer state with {', '.join(BALANCE_KEYS)}"
    return None


def load(path: str) -> dict:
    """Read a distillx checkpoint safely (see the module docstring); :class:`CheckpointError` for a
    missing, corrupt, incomplete, foreign or unsafe file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    _verify_archive(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint {path!r} holds objects other than tensors and plain values, which a "
                              "safe load refuses (distillx never runs code from a checkpoint): it was not written "
                              f"by this version of distillx, or it was altered. Detail: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path!r} cannot be read ({type(exc).__name__}: {exc}); it may be "
                              "truncated or not a distillx checkpoint") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a distillx checkpoint (no format marker {FORMAT!r})")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {ckpt.get('version')!r}; this distillx "
                              f"reads version {VERSION}")
    problem = _problem(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint {path!r} is not usable: {problem}")
    return ckpt


def save(state: dict, path: str) -> str:
    """Write a checkpoint :func:`build` returned, atomically, with a CRC-32 on every archive member."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    was = get() if get is not None else True
    if not was:
        torch.serialization.set_crc32_options(True)
    try:
        save_atomic(state, path)
    finally:
        if not was:
            torch.serialization.set_crc32_options(False)
    return path


def check_directory(directory: Optional[str], name: str = "checkpoint_dir") -> None:
    """Create ``directory`` and prove a file can be written there, before anything trains; an
    ``OSError`` naming ``name`` otherwise."""
    if directory is None:
        return
    try:
        os.makedirs(directory, exist_ok=True)
        with atomic_open(os.path.join(directory, ".distillx-write-test"), "wb") as f:
            f.write(b"ok")
        os.unlink(os.path.join(directory, ".distillx-write-test"))
    except OSError as exc:
        raise type(exc)(exc.errno, f"{name} {directory!r} is not a writable directory: "
                                   f"{exc.strerror or exc}; checkpoints could not be written there") from exc


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


FILENAME = "checkpoint.pt"  # the one checkpoint of a run, in its checkpoint_dir


def saved_world_size(position: dict) -> int:
    """How many processes wrote a checkpoint's position: several keep every one's random state
    (``{"ranks": [...]}``), one keeps its own."""
    rng = position["step_rng"]
    return len(rng["ranks"]) if "ranks" in rng else 1


def check_world_size(state: dict, world_size: int) -> None:
    """Warn, naming both, when the checkpoint was written by another number of processes than
    ``world_size`` (a run may go on at another world size, but not bitwise; the warning says what
    carries over exactly and what does not)."""
    saved = saved_world_size(state["position"])
    if saved == world_size:
        return
    warnings.warn(
        f"checkpoint {state['path']!r} was saved by {saved} process{'es' * (saved > 1)}; this run has {world_size}. "
        "Exact: the weights, the optimizer, LR-schedule and scaler states, the epoch and step reached, the history "
        "and the running sums of an interrupted epoch. Not exact: each process's random state (taken round robin "
        "from the saved processes': dropout, augmentations, a sampler without a generator of its own), the LR "
        "schedule's length when the steps per epoch change with the world size, and the position within an epoch, "
        "a step count, lands on the same samples only when the global batch (per-process batch x processes) is the "
        "saved run's. The run continues, but not bit for bit as the saved one would have", UserWarning, stacklevel=2)


def for_resume(resume, checkpoint_dir: Optional[str], want_phase: Optional[str], method_keys: list,
               student: torch.nn.Module, teacher: torch.nn.Module, world_size: int = 1,
               balance: Optional[dict] = None) -> Optional[dict]:
    """The checkpoint ``resume`` names (a path, or True for ``checkpoint_dir``'s), checked against the
    run: phase (when ``want_phase``), methods, loss balancing (``balance``: the run's
    ``{"mode", "primary", "every"}``, None without), the student's and saved teacher's keys and shapes,
    and the number of processes (:func:`check_world_size`: a warning). None when ``resume`` is
    None/False. ``state["path"]`` is where it was read."""
    if resume is None or resume is False:
        return None
    if resume is True and not checkpoint_dir:
        raise ValueError("resume=True needs checkpoint_dir= (where checkpoint.pt is); or pass the checkpoint path")
    path = os.path.join(checkpoint_dir, FILENAME) if resume is True else resume
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"resume must be a checkpoint path or True, got {type(resume).__name__}")
    path = os.fspath(path)
    state = load(path)
    if want_phase is not None and state["phase"] != want_phase:
        raise CheckpointError(f"checkpoint {path!r} is from the {state['phase']} phase, not the {want_phase} "
                              "phase; resume it with fit(..., resume=...)")
    if state["method_keys"] != list(method_keys):
        raise CheckpointError(f"checkpoint {path!r} was written with methods {state['method_keys']}, this "
                              f"Distiller has {list(method_keys)}")
    saved = state.get("balance")
    saved = None if saved is None else {k: saved[k] for k in ("mode", "primary", "every")}
    if saved != balance:
        def said(b):
            return "balance=None" if b is None else ", ".join(f"balance{'_' + k if k != 'mode' else ''}={v!r}"
                                                              for k, v in b.items())
        raise CheckpointError(f"checkpoint {path!r} was written with {said(saved)}, this Distiller has {said(balance)}: "
                              "the loss weights would not continue as they were; resume with the same balancing")
    if not state.get("sharded"):  # a sharded student is checked when its shards load
        check_state_dict(state["student"], student, "student", path)
    if state.get("teacher") is not None:
        check_state_dict(state["teacher"], teacher, "teacher", path)
    state["path"] = path
    check_world_size(state, world_size)
    return state


def build(phase: str, position: dict, *, student: torch.nn.Module, methods: list, method_keys: list,
          teacher: Optional[torch.nn.Module], optimizer, scheduler, scaler, metrics, history: dict,
          transfer_report: Optional[dict], sharded: Optional[str] = None, balance: Optional[dict] = None) -> dict:
    """The checkpoint of a distillation run at ``position`` of ``phase`` (``teacher`` None when its
    weights need not be saved: an untrained teacher is the user's own). ``sharded``: the student's,
    the methods' and the optimizer's states are in that distributed-checkpoint directory beside the
    file (``strategy="fsdp"``), not in it. ``balance``: the loss balancer's state (its weights and
    step count, :meth:`distillx.engine.balance.Balancer.state_dict`), None without balancing."""
    state = {
        "format": FORMAT, "version": VERSION, "phase": phase, "position": position,
        "student": {} if sharded else student.state_dict(),
        "methods": [{} if sharded else m.state_dict() for m in methods],
        "method_keys": list(method_keys), "teacher": teacher.state_dict() if teacher is not None else None,
        "optimizer": {} if sharded else optimizer.state_dict(), "optimizer_class": optimizer_class(optimizer),
        "scheduler": scheduler.state_dict() if scheduler else None,
        "scaler": scaler.state_dict() if scaler else None, "metrics": metrics.state_dict(),
        "history": history, "transfer_report": transfer_report, "sharded": sharded, "balance": balance,
    }
    check_plain(state, "checkpoint")
    return state


def optimizer_class(optimizer) -> str:
    """The optimizer's class as a checkpoint names it: ``torch.optim.adamw.AdamW``."""
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def _check_optimizer_class(state: dict, optimizer) -> None:
    """An optimizer's state loads into another class without complaint (the hyperparameters are
    replaced by the saved ones), and its first step fails on a missing one; name both classes first."""
    saved, current = state.get("optimizer_class"), optimizer_class(optimizer)
    if saved is not None and saved != current:
        raise CheckpointError(f"checkpoint {state['path']!r} was saved with optimizer {saved}, this run uses {current}: "
                              "an optimizer's state (its hyperparameters and running statistics) only loads into "
                              "its own class; resume with the optimizer the checkpoint was written with")


def _check_optimizer_groups(state: dict, optimizer, needed: set) -> None:
    """For a checkpoint that does not name its optimizer's class (older versions): the hyperparameters
    this run's optimizer needs (``needed``) and the loaded state lacks. (Its class's own defaults
    for hyperparameters newer than a checkpoint are filled in by ``load_state_dict``.)"""
    lacking = sorted(needed - {k for group in optimizer.param_groups for k in group})
    if lacking:
        raise CheckpointError(f"checkpoint {state['path']!r}: the saved optimizer state lacks "
                              f"{', '.join(map(repr, lacking))}, which this run's {type(optimizer).__name__} needs: it "
                              "was written by another optimizer; resume with the optimizer the checkpoint was written "
                              "with")


def restore(state: dict, *, student: torch.nn.Module, teacher: torch.nn.Module, methods: list, method_keys: list,
            metrics, optimizer, scheduler, scaler, load_sharded=None, balancer=None) -> bool:
    """Load a checkpoint :func:`for_resume` returned into the run's objects; True when it held
    the teacher's weights (a trained teacher). The optimizer, schedule, scaler and metrics states
    load first (they are what an altered checkpoint most likely breaks), the weights last; a sharded
    checkpoint's student, methods and optimizer come from ``load_sharded(directory)``."""
    sharded = state.get("sharded")
    if optimizer is not None:
        _check_optimizer_class(state, optimizer)
    needed = {k for group in optimizer.param_groups for k in group if k != "params"} if optimizer is not None else set()
    if sharded:
        try:
            load_sharded(os.path.dirname(state["path"]), sharded)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {state['path']!r}: its sharded states ({sharded}) do not load into "
                                  f"this run ({type(exc).__name__}: {exc})") from exc
    for obj, saved, what in ((None if sharded else optimizer, state["optimizer"], "optimizer"),
                             (scheduler, state.get("scheduler"), "scheduler"),
                             (scaler, state.get("scaler"), "scaler"), (metrics, state["metrics"], "metrics log")):
        if obj is None:
            continue
        if saved is None:
            raise CheckpointError(f"checkpoint {state['path']!r} has no {what} state but this run uses a {what}")
        try:
            obj.load_state_dict(saved)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise CheckpointError(f"checkpoint {state['path']!r}: the saved {what} state does not load into this "
                                  f"run's {what} ({type(exc).__name__}: {exc})") from exc
        if obj is optimizer and "optimizer_class" not in state:
            _check_optimizer_groups(state, optimizer, needed)
    for key, m, sd in zip(method_keys, methods, [] if sharded else state["methods"]):
        try:
            m.load_state_dict(sd)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {state['path']!r}: method {key!r} does not match its saved "
                                  f"state: {exc}") from exc
    if balancer is not None and state.get("balance") is not None:
        try:
            balancer.load_state_dict(state["balance"])
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {state['path']!r}: the saved balance state does not load into this "
                                  f"run ({type(exc).__name__}: {exc})") from exc
    if not sharded:
        student.load_state_dict(state["student"])
    if state.get("teacher") is not None:
        teacher.load_state_dict(state["teacher"])
    return state.get("teacher") is not None
