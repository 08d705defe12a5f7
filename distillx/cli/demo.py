"""``distillx demo``: train a teacher, a scratch student and a distilled student on the bundled
8x8 digits and compare parameters, test accuracy and CPU latency (:mod:`distillx.demo`);
``--mode head``: a head distilled on the teacher's features at each cut, deployed with the teacher's
trunk, against the full teacher and a scratch student (:mod:`distillx.experiments.head_search`)."""
from __future__ import annotations

import argparse

from ..demo import DEFAULT_EPOCHS, TEACHER_EPOCHS, format_table, publish, run, single_thread
from ..experiments import head_search


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="distillx demo",
        description="Train a teacher, a scratch student and a distilled student on the bundled 8x8 digits "
                    "and compare parameters, test accuracy and CPU latency.")
    parser.add_argument("--mode", choices=("students", "head"), default="students",
                        help="students: scratch vs distilled student; head: a head on the teacher's features at each "
                             "cut (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"student/head epochs (default {DEFAULT_EPOCHS}; 50 with --mode head)")
    parser.add_argument("--teacher-epochs", type=int, default=TEACHER_EPOCHS,
                        help="teacher epochs (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, initial weights and data order")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    for name in ("epochs", "teacher_epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    with single_thread():
        if args.mode == "head":
            result = head_search.run(epochs=args.epochs or 50, seed=args.seed, teacher_epochs=args.teacher_epochs)
            table = head_search.format_table(result)
        else:
            result = run(args.epochs or DEFAULT_EPOCHS, args.seed, args.teacher_epochs)
            table = format_table(result)
    publish(table, result, args.json)
    return 0
