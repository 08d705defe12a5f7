"""``distillx run CONFIG [--set KEY=VALUE ...] [--resume] [--quiet] [--print-config]``.

Runs a whole distillation from a TOML or JSON config (see :mod:`distillx.config` for the keys):
builds the data, the teacher and the student, trains the teacher (``teacher.epochs``), applies the
weight transfer, distils the student (``student.epochs``), then writes into ``output_dir``:

    checkpoint.pt   the latest training position (after every epoch; what --resume continues)
    config.json     the resolved config of the run (itself a valid config)
    metrics.json    every logged step and epoch metric;  metrics.png: their plot
    student.pt      the final student's state dict;  teacher.pt: the teacher's (when it was trained)
    student/        instead of student.pt for a Hugging Face student: save_pretrained + the tokenizer
    distillx-outputs.json   which of the files there distillx wrote (what --overwrite may delete)

CONFIG is a path (``.toml`` or ``.json``) or the name of a bundled config (``distillx run digits``).
``--set student.epochs=5 --set methods.0.T=4`` override keys (dotted paths, list items by index;
values are parsed as JSON or TOML values, else taken as strings). ``--resume`` continues from
``output_dir/checkpoint.pt`` (a finished run has nothing left to train unless ``student.epochs``
was raised); the checkpoint is verified and read without running code from it.

Which ``output_dir`` a run may write into: without ``--resume``, an ``output_dir`` that is missing
or empty, or that holds a distillx run of the same config which stopped before its first checkpoint
(``config.json`` there equals this run's resolved config, no ``checkpoint.pt``). A directory with a
checkpoint needs ``--resume`` or ``--overwrite``; any other non-empty directory (the user's own
``config.json``, say) is refused unless ``--overwrite``. ``--overwrite`` deletes only what the
previous run's ``distillx-outputs.json`` lists (output names above and files that ``save_pretrained``
wrote into ``student/``), only after the new run has loaded its models and data, and never a file
the new run reads (``--set teacher.checkpoint=OUT/teacher.pt`` keeps it until it is replaced);
every other file, and any folder without that manifest, is left alone: the run then only replaces
the files it writes. A teacher cache in ``output_dir`` (``training.cache_teacher``) is reused only
for the same teacher, captures and inputs, and rebuilt otherwise.
``--quiet`` (or ``DISTILLX_QUIET=1``) turns the progress bars off.

Exit status: 0 done; 2 a mistake in the config or in what it names (the message says which key);
3 a loss became NaN/inf (the message names the phase, epoch, step and loss term; the last checkpoint
is kept); 1 training failed otherwise; 130 interrupted (a checkpoint of the exact step is written; a
further SIGINT/SIGTERM more than DISTILLX_SIGNAL_WINDOW seconds, default 2, after the first stops at
once, keeping the last checkpoint). Under torchrun every rank first checks that all run the same
config (a difference is exit status 2, naming the ranks and keys); a rank that waits for the others
in a collective longer than DISTILLX_COLLECTIVE_TIMEOUT seconds (default 600) fails, naming itself.
"""
from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys

import torch.distributed as dist

from ..config.execute import PROG, StoppedByRankZero, execute
from ..config.files import apply_override, read_config
from ..config.schema import ConfigError, validate
from ..reporting.progress import quiet_from_env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Run a whole distillation from a TOML or JSON config.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("config", help="a .toml/.json config file, or the name of a bundled config (e.g. digits)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set student.epochs=5 --set methods.0.T=4")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="start from scratch even though OUTPUT_DIR holds an earlier run (the files its "
                             "distillx-outputs.json lists are removed, nothing else)")
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
    except StoppedByRankZero:
        return 2  # rank 0 said why
    except KeyboardInterrupt as exc:  # a further signal after the first (engine/signals.py): stop now
        if args.traceback:
            raise
        print(f"{_who()}{exc or 'interrupted'}; --resume continues from output_dir's checkpoint.pt, if one was "
              "written", file=sys.stderr)
        return 130
    except ConfigError as exc:
        if args.traceback:
            raise
        print(f"{_who()}{exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.traceback:
            raise
        print(f"{_who()}training failed: {type(exc).__name__}: {exc}\n{PROG}: (rerun with --traceback for the "
              "traceback)", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():  # under torchrun: leave the group cleanly
            gc.collect()  # the run's modules (FSDP meshes, DDP reducers) hold the group: free them first
            dist.destroy_process_group()


def _who() -> str:
    """``distillx run: `` , or ``distillx run (rank 1 of 2): `` under several processes."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f"{PROG} (rank {dist.get_rank()} of {dist.get_world_size()}): "
    return f"{PROG}: "
