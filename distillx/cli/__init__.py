"""The ``distillx`` command: ``info``, ``plugins``, ``demo``, ``bench``, ``transfer``, ``run``.

Each subcommand is a module of this package (``distillx/cli/<command>.py``) that owns its arguments
and exposes ``main(argv) -> int``; this file only dispatches, importing just the module asked for.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help); each module exposes main(argv) -> int
COMMANDS = {
    "info": ("distillx.cli.info", "torch version, compiled backends and the backend serving each op"),
    "plugins": ("distillx.cli.plugins", "list registered methods, transfers, kernels and augmentations"),
    "demo": ("distillx.cli.demo", "train teacher and students on the bundled digits data and compare them"),
    "bench": ("distillx.cli.bench", "time eager PyTorch, torch.compile and distillx side by side"),
    "transfer": ("distillx.cli.transfer", "initialise a student checkpoint from a teacher's weights and report it"),
    "run": ("distillx.cli.run", "run a whole distillation from a TOML/JSON config (distillx run digits)"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="distillx", description="Knowledge distillation toolkit for PyTorch")
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the command (see distillx COMMAND --help)")
    ns = parser.parse_args(argv[:1] if argv else argv)
    module = importlib.import_module(COMMANDS[ns.command][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
