"""``distillx transfer STRATEGY --teacher T --student S``: run a weight transfer on two checkpoints.

A checkpoint is either a whole model saved with ``torch.save(model, path)`` or a state dict
(``torch.save(model.state_dict(), path)``, optionally under a ``"state_dict"`` or ``"model"`` key)
together with ``--teacher-arch`` / ``--student-arch MODULE:CALLABLE``, a zero-argument builder of
the architecture. Whole-model files are pickles that can run code when loaded, so they are read only
with ``--allow-pickle``; state dicts are read with ``weights_only=True``.

Prints the :class:`~distillx.transfer.TransferReport` (``--json PATH`` or ``-`` writes it as JSON).
``--out PATH`` writes the initialised student in the student checkpoint's format (whole model or
state dict), atomically: a temporary file in the same directory, then a rename, so an interrupted
run never leaves a half-written checkpoint. Without ``--out`` nothing is written (a dry run).
Strategy options: ``--option key=value`` (repeatable; values are parsed as JSON when they can be,
``--option adapt=select --option seed=3``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
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


def load_model(path: str, arch: str | None, allow_pickle: bool, side: str) -> tuple[nn.Module, str]:
    """The model in ``path`` and its format ("module" or "state_dict")."""
    if not os.path.isfile(path):
        raise SystemExit(f"distillx transfer: --{side} {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a whole pickled model (or not a checkpoint at all)
        if not allow_pickle:
            raise SystemExit(f"distillx transfer: --{side} {path!r} is not a plain state dict ({type(exc).__name__}); "
                             "if it is a whole model saved with torch.save(model) and you trust the file, pass "
                             "--allow-pickle") from exc
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise SystemExit(f"distillx transfer: cannot load --{side} {path!r}: {exc2}") from exc2
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
            model = _builder(arch, f"--{side}-arch")()
            if not isinstance(model, nn.Module):
                raise SystemExit(f"distillx transfer: --{side}-arch {arch!r} returned {type(model).__name__}, "
                                 "not a torch.nn.Module")
            try:
                model.load_state_dict(state)
            except RuntimeError as exc:
                raise SystemExit(f"distillx transfer: --{side} {path!r} does not fit --{side}-arch {arch!r}: {exc}") from exc
            return model, "state_dict"
    raise SystemExit(f"distillx transfer: --{side} {path!r} holds a {type(obj).__name__}, not a model or a state dict")


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
    p.add_argument("--out", help="write the initialised student here (atomically); default: dry run")
    p.add_argument("--json", help="write the report as JSON to this path ('-' for stdout)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    teacher, _ = load_model(args.teacher, args.teacher_arch, args.allow_pickle, "teacher")
    student, fmt = load_model(args.student, args.student_arch, args.allow_pickle, "student")
    options = dict(args.option)
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
            with open(args.json, "w") as f:
                json.dump(report.to_dict(), f, indent=2)
    if args.out:
        save_atomic(student if fmt == "module" else student.state_dict(), args.out)
        print(f"wrote the initialised student to {args.out} ({'whole model' if fmt == 'module' else 'state dict'})",
              file=sys.stderr if args.json == "-" else sys.stdout)
    return 0
