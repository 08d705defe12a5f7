"""``distillx run CONFIG [--set KEY=VALUE ...] [--resume] [--quiet] [--print-config]``.

Runs a whole distillation from a TOML or JSON config (see :mod:`distillx.config` for the keys):
builds the data, the teacher and the student, trains the teacher (``teacher.epochs``), applies the
weight transfer, distils the student (``student.epochs``), then writes into ``output_dir``:

    checkpoint.pt   the latest training position (after every epoch; what --resume continues)
    config.json     the resolved config of the run (itself a valid config)
    metrics.json    every logged step and epoch metric;  metrics.png: their plot
    student.pt      the final student's state dict;  teacher.pt: the teacher's (when it was trained)

CONFIG is a path (``.toml`` or ``.json``) or the name of a bundled config (``distillx run digits``).
``--set student.epochs=5 --set methods.0.T=4`` override keys (dotted paths, list items by index;
values are parsed as JSON or TOML values, else taken as strings). ``--resume`` continues from
``output_dir/checkpoint.pt`` (a finished run has nothing left to train unless ``student.epochs``
was raised); without it an existing checkpoint is refused unless ``--overwrite``.
``--quiet`` (or ``DISTILLX_QUIET=1``) turns the progress bars off.

Exit status: 0 done; 2 a mistake in the config or in what it names (the message says which key);
3 a loss became NaN/inf (the message names the phase, epoch, step and loss term; the last checkpoint
is kept); 1 training failed otherwise; 130 interrupted (a checkpoint of the exact step is written).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from importlib import resources
from typing import Any, Optional

from .schema import ConfigError, check_path, describe, validate

PROG = "distillx run"
FORMATS = {".toml": "toml", ".json": "json"}
OUTPUTS = ("checkpoint.pt", "config.json", "metrics.json", "metrics.png", "student.pt", "teacher.pt")


# -- reading ---------------------------------------------------------------------------------------
def toml_module():
    """``tomllib`` (Python >= 3.11) or ``tomli``; a ConfigError saying what to do otherwise."""
    try:
        import tomllib  # type: ignore[import-not-found]
        return tomllib
    except ImportError:
        pass
    try:
        import tomli  # type: ignore[import-not-found]
        return tomli
    except ImportError:
        raise ConfigError("reading TOML needs Python >= 3.11 (tomllib) or the tomli package (pip install tomli); "
                          "or write the config as JSON") from None


def _bundled_files() -> dict:
    root = resources.files("distillx").joinpath("configs")
    if not root.is_dir():
        return {}
    return {e.name: e for e in root.iterdir() if os.path.splitext(e.name)[1] in FORMATS}


def bundled_configs() -> dict:
    """name -> resource of every config shipped in ``distillx/configs``; where a name has both, the TOML
    one (the JSON one when no TOML reader is installed: Python < 3.11 without tomli)."""
    try:
        toml_module()
        toml_first = True
    except ConfigError:
        toml_first = False
    found: dict = {}
    for filename, entry in sorted(_bundled_files().items(),
                                  key=lambda kv: (kv[0].endswith(".json") == toml_first, kv[0])):
        found.setdefault(os.path.splitext(filename)[0], entry)
    return found


def read_config(config: str) -> tuple[str, dict]:
    """``(source, document)`` for a config path, or a bundled config's name (``digits``) or file name
    (``digits.json``)."""
    if os.path.exists(config):
        if os.path.isdir(config):
            raise ConfigError(f"config {config!r} is a directory, not a .toml or .json file")
        ext = os.path.splitext(config)[1].lower()
        if ext not in FORMATS:
            raise ConfigError(f"config {config!r}: unsupported file type {ext or '(none)'!r}; use .toml or .json")
        with open(config, encoding="utf-8") as f:
            text = f.read()
        return config, parse_config(text, FORMATS[ext], config)
    entry = _bundled_files().get(config) or bundled_configs().get(config)
    if entry is None:
        raise ConfigError(f"config {config!r}: no such file, and no bundled config of that name (bundled: "
                          f"{', '.join(sorted(bundled_configs())) or 'none'})")
    source = f"bundled config {entry.name!r}"
    return source, parse_config(entry.read_text(encoding="utf-8"), FORMATS[os.path.splitext(entry.name)[1]], source)


def parse_config(text: str, fmt: str, source: str) -> dict:
    if fmt == "toml":
        toml = toml_module()
        try:
            return toml.loads(text)
        except toml.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}", source) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"invalid JSON: {exc}", source) from None


def load(config: str, overrides=()) -> dict:
    """The resolved config of ``config`` (a path or a bundled name) with ``overrides`` (``"key=value"``
    strings, as for ``--set``) applied; :class:`ConfigError` for any problem."""
    source, raw = read_config(config)
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, source)


# -- --set overrides -----------------------------------------------------------------------------
def _plain(value: Any) -> bool:
    if isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON (``4``, ``1e-3``, ``true``, ``[64, 32, 10]``, ``{"a": 1}``), else a TOML
    value (``'x'``, ``{a = 1}``, ``nan``), else the text itself as a string."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        toml = toml_module()
        value = toml.loads(f"v = {text}")["v"]
        if _plain(value):  # not a TOML date or time: keep those as the string they were
            return value
    except Exception:
        pass
    return text


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``KEY=VALUE`` override to the parsed document ``raw`` (in place)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. student.epochs=5), got {item!r}")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"--set {key}: empty key in the dotted path")
    try:
        check_path(parts, raw)
    except ConfigError as exc:
        raise ConfigError(f"--set {key}: {exc}") from None
    value = parse_value(text.strip())
    node: Any = raw
    for i, part in enumerate(parts):
        here = ".".join(parts[:i]) or "the config"
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {here} has {len(node)} item(s); index {part} is out of range "
                                  f"(set the whole array with --set {here}=[...])")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    if parts[i + 1].isdigit():
                        raise ConfigError(f"--set {key}: the config has no {'.'.join(parts[:i + 1])} array to "
                                          f"index; set it whole with --set {'.'.join(parts[:i + 1])}=[...]")
                    node[part] = {}  # a table the config left out (its defaults apply to the rest)
                node = node[part]
        else:
            raise ConfigError(f"--set {key}: {here} is {describe(node)}, not a table or an array")


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
    from .._atomic import atomic_open

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
    import torch

    from ..distiller import NonFiniteLossError
    from .._atomic import save_atomic
    from ..engine import checkpoint as ckpt
    from ..engine.loop import TrainingInterrupted
    from .build import _message, build

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
                written = ["checkpoint.pt", "config.json", "student.pt"]
                save_atomic({k: v.detach().cpu() for k, v in run.student.state_dict().items()},
                                 path["student.pt"])
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Run a whole distillation from a TOML or JSON config.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("config", help="a .toml/.json config file, or the name of a bundled config (e.g. digits)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set student.epochs=5 --set methods.0.T=4")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="start from scratch even though OUTPUT_DIR holds an earlier run (its files are removed)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (also DISTILLX_QUIET=1)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults filled in, overrides applied) as JSON and exit")
    parser.add_argument("--traceback", action="store_true",
                        help="show the Python traceback of an error instead of a one-line message")
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has printed
        return exc.code if isinstance(exc.code, int) else 2
    from ..reporting.progress import quiet_from_env

    try:
        source, raw = read_config(args.config)
        for item in args.overrides:
            apply_override(raw, item)
        cfg = validate(raw, source)
        if args.resume and args.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other; pass one")
        if args.print_config:
            print(json.dumps(cfg, indent=2, default=str))
            return 0
        progress = False if (args.quiet or quiet_from_env()) else cfg["training"]["progress"]
        command = " ".join([PROG, args.config] + [f"--set {shlex.quote(o)}" for o in args.overrides])
        return execute(cfg, source, args.resume, args.overwrite, progress, command)
    except ConfigError as exc:
        if args.traceback:
            raise
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.traceback:
            raise
        print(f"{PROG}: training failed: {type(exc).__name__}: {exc}\n{PROG}: (rerun with --traceback for the "
              "traceback)", file=sys.stderr)
        return 1
