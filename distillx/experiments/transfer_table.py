"""Weight transfer x KD on the digits demo: student accuracy at initialisation and after short training.

Run::

    python -m distillx.experiments.transfer_table [--seeds 0,1,2] [--epochs 20] [--json PATH]
        [--inits random,direct,distribution,select,head_fit,prune] [--students 64-32-10,64-128-10]
        [--teacher-epochs 60]

It prints one markdown table per student shape and, with ``--json``, writes every measurement.

Protocol
--------
Everything reuses :mod:`distillx.demo`: its data split (:func:`~distillx.data.digits_split` with
``demo.TEST_FRACTION``), its :func:`~distillx.demo.mlp` models, its teacher recipe
(``TEACHER_WIDTHS`` 64-256-256-10, dropout ``TEACHER_DROPOUT``, AdamW lr ``TEACHER_LR`` for
``TEACHER_EPOCHS`` epochs), its student optimizer (AdamW lr ``demo.LR``), batch size and KD recipe
(``kd`` with ``KD_T``, ``KD_WEIGHT`` and ``TASK_WEIGHT``, i.e. pure distillation: the "with kd"
student never sees a label).

Per seed ``s`` (default 0, 1, 2):

1. **One teacher per seed**, because the seed also picks the train/test split (as in the demo): a
   teacher trained on another seed's split would have seen that seed's test images. The global RNG
   is seeded with ``s``, the teacher is built, then the student; the teacher is trained exactly as
   :func:`distillx.demo.run` trains it, so for ``64-32-10`` the teacher *and* the random student
   are bit-for-bit the demo's (the "random" rows at ``--epochs 150`` are the demo's scratch and
   kd students; the test checks this at 1 epoch).
2. **One random initial student per shape and seed**: the weights drawn from the RNG state right
   after building the teacher (for the demo shape, the demo's own draw). Every init of that seed
   starts from a deep copy of it, so a transfer only changes what it writes and all inits share
   the rest (e.g. ``head_fit`` and ``distribution`` keep this random hidden layer).
3. **Init** ``random`` (nothing more) or ``distillx.transfer(name, teacher, student, **options)``
   with the library defaults plus: ``distribution``: ``seed=s``; ``head_fit``:
   ``calibration=`` a loader over the training split (same construction as the training loader,
   but its own instance, so it does not advance the training loader's shuffling). ``direct``
   (truncate) and ``select`` (uniform selection) shrink the teacher's first layer (256x64) and
   output layer (10x256) to the student's widths; the student's one hidden layer takes the
   teacher's *first* hidden layer (first-N layer rule).
4. **Accuracy at init** on the test split.
5. **The same short training twice** from that init: "no kd" = :func:`distillx.engine.train`
   with cross-entropy (the demo's scratch student), "kd" = :class:`distillx.Distiller` with the
   demo's kd recipe. Both use a fresh AdamW (lr ``demo.LR``) and a fresh training loader with
   seed ``s``, so every run of a seed sees the same batches in the same order. ``--epochs``
   (default 20, i.e. 440 steps, against the demo's 150 epochs) is fixed for the whole table.
6. **Accuracy after training** on the test split.

Reported per (student shape, init, training): mean and sample standard deviation (n-1) over the
seeds of the accuracy at init and after training, the per-seed values, and "vs random": the mean
(and sd) over seeds of the paired difference to the random-init student of the same seed after
the same training. There is no validation split (as in the demo): nothing here is tuned on the
test split, the strategies run with their defaults, but three seeds on 450 test images (one image
= 0.22 points) make differences below about a point indistinguishable from noise.

Everything runs on one CPU thread (:func:`distillx.demo.single_thread`), so the numbers are
reproducible bit for bit on a given machine and PyTorch build.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Any, Iterable, Optional, Sequence

import torch

from .. import demo
from ..data import digits_split, tensor_loader
from ..distiller import Distiller
from ..engine.training import evaluate, train
from ..plugin import get_registries, method, transfer

INITS = ("random", "direct", "distribution", "select", "head_fit", "prune")
SEEDS = (0, 1, 2)
EPOCHS = 20
STUDENTS = (tuple(demo.STUDENT_WIDTHS), (64, 128, 10))
TRAININGS = ("no kd", "kd")


def widths_name(widths: Sequence[int]) -> str:
    return "-".join(str(w) for w in widths)


def parse_widths(text: str) -> tuple[int, ...]:
    widths = tuple(int(w) for w in text.split("-"))
    if len(widths) < 2 or widths[0] != demo.TEACHER_WIDTHS[0] or widths[-1] != demo.TEACHER_WIDTHS[-1] \
            or any(w < 1 for w in widths):
        raise ValueError(f"student widths must run from {demo.TEACHER_WIDTHS[0]} to {demo.TEACHER_WIDTHS[-1]}, "
                         f"got {text!r}")
    return widths


def _adamw(lr: float):
    return lambda params: torch.optim.AdamW(params, lr=lr)


def _init_options(name: str, seed: int, calibration: Iterable) -> dict[str, Any]:
    """The options this experiment passes to a transfer (the rest are the strategy's defaults)."""
    if name == "distribution":
        return {"seed": seed}
    if name in ("head_fit", "prune"):
        return {"calibration": calibration}
    return {}


def _describe_options(name: str) -> dict[str, str]:
    if name == "distribution":
        return {"seed": "the run's seed"}
    if name in ("head_fit", "prune"):
        return {"calibration": "the training split, batches of the training loader"}
    return {}


def run_seed(seed: int, students: Sequence[tuple[int, ...]], inits: Sequence[str], epochs: int,
             teacher_epochs: int) -> dict:
    """Train seed ``seed``'s teacher and every (student, init, training) run; return its measurements."""
    split = digits_split(demo.TEST_FRACTION, seed)

    def train_loader():
        # A fresh loader with the same seed yields the same batch sequence for every run.
        return tensor_loader(split.x_train, split.y_train, demo.BATCH_SIZE, shuffle=True, seed=seed)

    test_loader = tensor_loader(split.x_test, split.y_test, 512)

    # RNG: as demo.run: seed, teacher, then the demo student; other shapes draw from the same point.
    torch.manual_seed(seed)
    teacher = demo.mlp(demo.TEACHER_WIDTHS, demo.TEACHER_DROPOUT)
    after_teacher = torch.get_rng_state()
    initial = {}
    for widths in students:
        torch.set_rng_state(after_teacher)
        initial[widths] = demo.mlp(widths)
    torch.set_rng_state(after_teacher)
    demo.mlp(demo.STUDENT_WIDTHS)  # leave the RNG where demo.run leaves it before training its teacher

    start = time.perf_counter()
    train(teacher, train_loader(), teacher_epochs, optimizer=_adamw(demo.TEACHER_LR))
    teacher_s = time.perf_counter() - start
    teacher_acc = evaluate(teacher, test_loader)["accuracy"]
    teacher.eval()

    runs = []
    for widths in students:
        for init in inits:
            student = copy.deepcopy(initial[widths])
            report = None
            if init != "random":
                report = transfer(init, teacher, student, **_init_options(init, seed, train_loader()))
            acc_init = evaluate(student, test_loader)["accuracy"]
            after = {}
            for training in TRAININGS:
                model = copy.deepcopy(student)
                torch.manual_seed(seed)  # nothing below should draw from it; this makes sure it cannot differ
                if training == "no kd":
                    train(model, train_loader(), epochs, optimizer=_adamw(demo.LR))
                else:
                    kd = method("kd", T=demo.KD_T, weight=demo.KD_WEIGHT)
                    with Distiller(teacher, model, methods=[kd], task_weight=demo.TASK_WEIGHT,
                                   optimizer=_adamw(demo.LR), scheduler=None) as distiller:
                        distiller.fit(train_loader(), epochs)
                after[training] = evaluate(model, test_loader)["accuracy"]
            runs.append({
                "student": widths_name(widths), "init": init, "seed": seed, "acc_init": acc_init,
                "acc_after": after,
                "transfer": None if report is None else {"headline": report.headline(), "counts": report.counts(),
                                                         "notes": list(report.notes)},
            })
    return {"seed": seed, "teacher_accuracy": teacher_acc, "teacher_seconds": teacher_s,
            "train": len(split.y_train), "test": len(split.y_test), "runs": runs}


def _stats(values: Sequence[float]) -> dict[str, Optional[float]]:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(per_seed: Sequence[dict], students: Sequence[str], inits: Sequence[str]) -> list[dict]:
    """One row per (student, init, training): stats over seeds and the paired difference to random."""
    runs = {(r["student"], r["init"], r["seed"]): r for s in per_seed for r in s["runs"]}
    seeds = [s["seed"] for s in per_seed]
    rows = []
    for student in students:
        for init in inits:
            for training in TRAININGS:
                at_init = [runs[student, init, s]["acc_init"] for s in seeds]
                after = [runs[student, init, s]["acc_after"][training] for s in seeds]
                row = {"student": student, "init": init, "training": training, "seeds": seeds,
                       "acc_init": at_init, "acc_after": after,
                       "acc_init_stats": _stats(at_init), "acc_after_stats": _stats(after), "vs_random": None}
                if "random" in inits:
                    diff = [a - runs[student, "random", s]["acc_after"][training] for a, s in zip(after, seeds)]
                    row["vs_random"] = {"per_seed": diff, **_stats(diff)}
                rows.append(row)
    return rows


def run(seeds: Sequence[int] = SEEDS, epochs: int = EPOCHS, inits: Sequence[str] = INITS,
        students: Sequence[tuple[int, ...]] = STUDENTS, teacher_epochs: int = demo.TEACHER_EPOCHS) -> dict:
    """Run the whole table (see the module docstring); return a JSON-serialisable dict."""
    start = time.perf_counter()
    per_seed = [run_seed(seed, students, inits, epochs, teacher_epochs) for seed in seeds]
    names = [widths_name(w) for w in students]
    return {
        "experiment": "transfer_table",
        "dataset": {"name": "digits", "train": per_seed[0]["train"], "test": per_seed[0]["test"],
                    "test_fraction": demo.TEST_FRACTION},
        "seeds": list(seeds), "epochs": epochs, "teacher_epochs": teacher_epochs,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "recipe": {"teacher": list(demo.TEACHER_WIDTHS), "teacher_dropout": demo.TEACHER_DROPOUT,
                   "teacher_lr": demo.TEACHER_LR, "optimizer": "AdamW", "lr": demo.LR,
                   "batch_size": demo.BATCH_SIZE,
                   "kd": {"T": demo.KD_T, "weight": demo.KD_WEIGHT, "task_weight": demo.TASK_WEIGHT},
                   "students": names,
                   "init_options": {i: _describe_options(i) for i in inits if i != "random"}},
        "teachers": [{"seed": s["seed"], "test_accuracy": s["teacher_accuracy"],
                      "train_seconds": s["teacher_seconds"]} for s in per_seed],
        "rows": aggregate(per_seed, names, inits),
        "runs": [r for s in per_seed for r in s["runs"]],
        "wall_seconds": time.perf_counter() - start,
    }


def _pct(stats: dict) -> str:
    sd = stats["sd"]
    return f"{100 * stats['mean']:.2f}" + ("" if sd is None else f" ± {100 * sd:.2f}")


def _signed(stats: dict) -> str:
    sd = stats["sd"]
    return f"{100 * stats['mean']:+.2f}" + ("" if sd is None else f" ± {100 * sd:.2f}")


def _values(values: Sequence[float]) -> str:
    return " / ".join(f"{100 * v:.2f}" for v in values)


def format_table(result: dict) -> str:
    """Markdown: a header, then one table per student shape (accuracies in %)."""
    d, r = result["dataset"], result["recipe"]
    seeds = ", ".join(str(s) for s in result["seeds"])
    teachers = " / ".join(f"{100 * t['test_accuracy']:.2f}" for t in result["teachers"])
    kd = r["kd"]
    lines = [
        f"Weight transfer x KD, digits ({d['train']} train / {d['test']} test), seeds {seeds}; "
        f"teacher {'-'.join(map(str, r['teacher']))} ({result['teacher_epochs']} epochs, test acc {teachers} %); "
        f"students trained {result['epochs']} epochs, AdamW lr {r['lr']}, batch {r['batch_size']}; "
        f"kd: T={kd['T']}, weight={kd['weight']}, task_weight={kd['task_weight']}; "
        f"{result['threads']} CPU thread. Test accuracy in %, mean ± sd over seeds (per-seed values in seed order); "
        f"'vs random': paired difference to the random-init student after the same training.",
    ]
    epochs = result["epochs"]
    for student in r["students"]:
        lines += ["", f"Student {student}:", "",
                  f"| init | training | acc at init | acc after {epochs} ep | vs random | per-seed at init "
                  f"| per-seed after |",
                  "|---|---|---:|---:|---:|---|---|"]
        for row in result["rows"]:
            if row["student"] != student:
                continue
            vs = "" if row["vs_random"] is None or row["init"] == "random" else _signed(row["vs_random"])
            lines.append(f"| {row['init']} | {row['training']} | {_pct(row['acc_init_stats'])} | "
                         f"{_pct(row['acc_after_stats'])} | {vs} | {_values(row['acc_init'])} | "
                         f"{_values(row['acc_after'])} |")
    lines += ["", f"wall time {result['wall_seconds']:.1f} s"]
    return "\n".join(lines)


def _list(parser: argparse.ArgumentParser, text: str, what: str, convert) -> list:
    try:
        items = [convert(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        parser.error(f"--{what}: {exc}")
    if not items:
        parser.error(f"--{what} is empty")
    if len(set(items)) != len(items):
        parser.error(f"--{what} repeats an entry: {text!r}")
    return items


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distillx.experiments.transfer_table",
        description="Student test accuracy at init and after short training, per weight-transfer init, "
                    "with and without kd, over several seeds, on the digits demo (see the module docstring).")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="student epochs (default %(default)s)")
    parser.add_argument("--teacher-epochs", type=int, default=demo.TEACHER_EPOCHS,
                        help="teacher epochs (default: the demo's, %(default)s)")
    parser.add_argument("--inits", default=",".join(INITS),
                        help="'random' and/or registered weight transfers (default %(default)s)")
    parser.add_argument("--students", default=",".join(widths_name(w) for w in STUDENTS),
                        help="student widths, comma-separated (default %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement as JSON to PATH")
    args = parser.parse_args(argv)
    for name in ("epochs", "teacher_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    seeds = _list(parser, args.seeds, "seeds", int)
    students = _list(parser, args.students, "students", parse_widths)
    inits = _list(parser, args.inits, "inits", str)
    known = ["random"] + list(get_registries().transfers.names())
    unknown = [i for i in inits if i not in known]
    if unknown:
        parser.error(f"--inits: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    with demo.single_thread():
        result = run(seeds, args.epochs, inits, students, args.teacher_epochs)
    demo.publish(format_table(result), result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
