"""``distillx demo``: train a teacher, a scratch student and a distilled student on the bundled
8x8 digits and compare parameters, test accuracy and CPU latency (:mod:`distillx.demo`)."""
from __future__ import annotations

import argparse
import json

from ..demo import DEFAULT_EPOCHS, TEACHER_EPOCHS, format_table, run, single_thread


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="distillx demo",
        description="Train a teacher, a scratch student and a distilled student on the bundled 8x8 digits "
                    "and compare parameters, test accuracy and CPU latency.")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="student epochs (default %(default)s)")
    parser.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS,
                        help="teacher epochs (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, initial weights and data order")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    for name in ("epochs", "teacher_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    with single_thread():
        result = run(args.epochs, args.seed, args.teacher_epochs)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
