"""``distillx transfer STRATEGY --teacher T --student S``: run a weight transfer on two checkpoints.

A checkpoint is either a whole model saved with ``torch.save(model, path)`` or a state dict
(``torch.save(model.state_dict(), path)``, optionally under a ``"state_dict"`` or ``"model"`` key)
together with ``--teacher-arch`` / ``--student-arch MODULE:CALLABLE``, a zero-argument builder of
the architecture. Whole-model files are pickles that can run code when loaded, so they are read only
with ``--allow-pickle``; state dicts are read with ``weights_only=True``. A file is checked first
(the zip archive's CRC-32s, its pickle parsed without running it): a truncated or corrupt file is
reported as such, and ``--allow-pickle`` is suggested only for an intact file that holds objects.
Every error (a builder that raises, an ``--out``/``--json`` path that is a directory or cannot be
written) is one line naming the flag, never a traceback.

Prints the :class:`~distillx.transfer.TransferReport` (``--json PATH`` or ``-`` writes it as JSON).
``--out PATH`` writes the initialised student in the student checkpoint's format (whole model or
state dict), atomically: a temporary file in the same directory, then a rename, so an interrupted
run never leaves a half-written checkpoint. Without ``--out`` nothing is written (a dry run).
Strategy options: ``--option key=value`` (repeatable; values are parsed as JSON when they can be,
``--option adapt=select --option seed=3``).

``--calibration DATA`` gives the strategies that look at data (``prune``, ``layer_map`` with
``--option map=auto``, ``head_fit``) their batches: a ``.pt`` file read with ``weights_only=True``
holding one batch (a tensor, an ``(inputs, targets)`` pair or a dict of tensors such as a
tokenizer's output) or a list of batches; or ``MODULE:CALLABLE``, a zero-argument function returning
an iterable of batches (a DataLoader).
"""
from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import pickle
import pickletools
import sys
import zipfile
from typing import Any, Callable

import torch
from torch import nn

from .._atomic import save_atomic
from ..plugin import transfer


def _builder(spec: str, flag: str) -> Callable[[], nn.Module]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"distillx transfer: {flag} must be MODULE:CALLABLE (e.g. mypkg.models:small_net), got {spec!r}")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"distillx transfer: cannot import {flag} {spec!r}: {exc}") from exc
    if not callable(obj):
        raise SystemExit(f"distillx transfer: {flag} {spec!r} is not callable")
    return obj


def _parses(stream, count: int) -> bool:
    """Whether ``count`` pickles follow in ``stream``: their opcodes are read, nothing is executed."""
    try:
        for _ in range(count):
            for _op in pickletools.genops(stream):
                pass
    except Exception:  # noqa: BLE001 - any parse failure means the same: not an intact pickle
        return False
    return True


def _damage(path: str) -> str | None:
    """Why ``path`` is not an intact ``torch.save`` file (truncated, a member failing its CRC-32, a
    pickle that does not parse), or None. Decides whether suggesting --allow-pickle makes sense."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                return "its zip archive is truncated or damaged (no readable directory at its end)"
            f.seek(0)
            # The legacy format: magic number, protocol, system info, the object, its storage keys.
            return None if _parses(f, 5) else "it is not a torch.save file (its pickles do not parse)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is None:
                pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                if not pickles or not _parses(io.BytesIO(archive.read(pickles[0])), 1):
                    return "its data.pkl is missing or does not parse"
    except Exception as exc:  # noqa: BLE001 - any damage of the archive is reported as such
        return f"its zip archive is damaged ({type(exc).__name__}: {exc})"
    return None if bad is None else f"the data of {bad!r} fails its CRC-32 check"


def _check_intact(path: str, flag: str, missing: str = "does not exist") -> None:
    """One line naming ``flag`` when ``path`` is not a file or not an intact ``torch.save`` file."""
    if not os.path.isfile(path):
        raise SystemExit(f"distillx transfer: {flag} {path!r} {missing}")
    damage = _damage(path)
    if damage:
        raise SystemExit(f"distillx transfer: {flag} {path!r} is corrupt or truncated: {damage}")


def load_model(path: str, arch: str | None, allow_pickle: bool, side: str) -> tuple[nn.Module, str]:
    """The model in ``path`` and its format ("module" or "state_dict")."""
    _check_intact(path, f"--{side}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # intact, but holds objects: a whole pickled model?
        if not allow_pickle:
            raise SystemExit(f"distillx transfer: --{side} {path!r} is not a plain state dict (it holds pickled "
                             "objects); if it is a whole model saved with torch.save(model) and you trust the file, "
                             "pass --allow-pickle") from exc
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise SystemExit(f"distillx transfer: cannot load --{side} {path!r}: {exc2}") from exc2
    except Exception as exc:
        raise SystemExit(f"distillx transfer: --{side} {path!r} cannot be read ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); it may be truncated or not a torch "
                         "checkpoint") from exc
    if isinstance(obj, nn.Module):
        return obj, "module"
    if isinstance(obj, dict):
        state = obj.get("state_dict", obj.get("model", obj))
        if isinstance(state, nn.Module):
            return state, "module"
        if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
            if arch is None:
                raise SystemExit(f"distillx transfer: --{side} {path!r} holds a state dict; say which architecture "
                                 f"it belongs to with --{side}-arch MODULE:CALLABLE")
            try:
                model = _builder(arch, f"--{side}-arch")()
            except SystemExit:
                raise
            except Exception as exc:
                raise SystemExit(f"distillx transfer: --{side}-arch {arch!r} raised {type(exc).__name__}: {exc}") from exc
            if not isinstance(model, nn.Module):
                raise SystemExit(f"distillx transfer: --{side}-arch {arch!r} returned {type(model).__name__}, "
                                 "not a torch.nn.Module")
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                raise SystemExit(f"distillx transfer: --{side} {path!r} does not fit --{side}-arch {arch!r}: {exc}") from exc
            return model, "state_dict"
    raise SystemExit(f"distillx transfer: --{side} {path!r} holds a {type(obj).__name__}, not a model or a state dict")


def load_calibration(spec: str) -> Any:
    """``--calibration``: a ``.pt`` file of one batch or a list of batches, or ``MODULE:CALLABLE``."""
    if not os.path.exists(spec) and ":" in spec:
        try:
            return _builder(spec, "--calibration")()
        except SystemExit:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's builder: one line naming the flag
            raise SystemExit(f"distillx transfer: --calibration {spec!r} raised {type(exc).__name__}: {exc}") from exc
    _check_intact(spec, "--calibration", "is neither a file nor MODULE:CALLABLE")
    try:
        data = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - anything torch.load refuses: one line, never a traceback
        raise SystemExit(f"distillx transfer: --calibration {spec!r} cannot be read with weights_only=True "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); save tensors, "
                         "tuples, lists or dicts of tensors") from exc
    return data if isinstance(data, list) else [data]


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option must be key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distillx transfer", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("strategy", help="a registered strategy (distillx plugins lists them), e.g. select")
    p.add_argument("--teacher", required=True, help="teacher checkpoint")
    p.add_argument("--student", required=True, help="student checkpoint (its weights are the starting point)")
    p.add_argument("--teacher-arch", help="MODULE:CALLABLE building the teacher, for a state-dict checkpoint")
    p.add_argument("--student-arch", help="MODULE:CALLABLE building the student, for a state-dict checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="allow whole-model (pickled) checkpoints")
    p.add_argument("--option", action="append", type=_option, default=[], metavar="KEY=VALUE",
                   help="strategy option (repeatable)")
    p.add_argument("--calibration", metavar="DATA",
                   help="batches for prune / layer_map map=auto / head_fit: a .pt file (a batch or a list of "
                        "batches, read with weights_only=True) or MODULE:CALLABLE returning an iterable of batches")
    p.add_argument("--out", help="write the initialised student here (atomically); default: dry run")
    p.add_argument("--json", help="write the report as JSON to this path ('-' for stdout)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value in (("--out", args.out), ("--json", None if args.json == "-" else args.json)):
        if value is not None and (os.path.isdir(value) or value.endswith(os.sep)):
            raise SystemExit(f"distillx transfer: {flag} {value!r} is a directory; give the path of the file to write")
    teacher, _ = load_model(args.teacher, args.teacher_arch, args.allow_pickle, "teacher")
    student, fmt = load_model(args.student, args.student_arch, args.allow_pickle, "student")
    options = dict(args.option)
    if args.calibration is not None:
        options["calibration"] = load_calibration(args.calibration)
    try:
        report = transfer(args.strategy, teacher, student, **options)
    except (TypeError, ValueError, KeyError) as exc:
        print(f"distillx transfer: {exc}", file=sys.stderr)
        return 2
    if args.json == "-":
        json.dump(report.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(report.summary())
        if args.json:
            try:
                with open(args.json, "w") as f:
                    json.dump(report.to_dict(), f, indent=2)
            except OSError as exc:
                raise SystemExit(f"distillx transfer: --json {args.json!r} cannot be written: {exc}") from exc
    if args.out:
        try:
            save_atomic(student if fmt == "module" else student.state_dict(), args.out)
        except OSError as exc:
            raise SystemExit(f"distillx transfer: --out {args.out!r} cannot be written: {exc}") from exc
        print(f"wrote the initialised student to {args.out} ({'whole model' if fmt == 'module' else 'state dict'})",
              file=sys.stderr if args.json == "-" else sys.stdout)
    return 0
