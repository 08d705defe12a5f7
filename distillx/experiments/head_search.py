"""Where to cut: the same student head distilled on the teacher's features at several depths.

``python -m distillx.experiments.head_search`` (and ``distillx demo --mode head``) trains the digits
demo's teacher (:mod:`distillx.demo`), then, for every cut, one head (``HEAD_HIDDEN`` hidden units)
distilled from the teacher's logits on the teacher's feature there (``Distiller(student_input=CUT)``,
the demo's kd recipe), and reports for each cut the parameters and the latency per batch of the
deployed model (:func:`distillx.compose`: the teacher trunk up to the cut, then the head) and its test
accuracy, next to the full teacher and the demo's scratch student. The trade-off a user picks a cut by:
an earlier cut keeps fewer teacher layers (cheaper), a later one keeps more of what the teacher learnt.
Everything runs on one CPU thread.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Optional, Sequence

import torch

from .. import demo
from ..compose import compose, latency_ms, num_parameters
from ..data import digits_split, tensor_loader
from ..distiller import Distiller
from ..engine.training import evaluate, train
from ..plugin import method

# Cuts of the demo teacher 64-256-256-10 (Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear):
# after its first hidden layer and after its second (its penultimate feature).
CUTS = ("1", "4")
HEAD_HIDDEN = 32


def run(cuts: Sequence[str] = CUTS, epochs: int = 50, seed: int = 0, teacher_epochs: int = demo.TEACHER_EPOCHS,
        head_hidden: int = HEAD_HIDDEN) -> dict:
    """Train the teacher, the scratch student and one head per cut; return every row."""
    split = digits_split(demo.TEST_FRACTION, seed)

    def train_loader():
        return tensor_loader(split.x_train, split.y_train, demo.BATCH_SIZE, shuffle=True, seed=seed)

    def adamw(lr):
        return lambda params: torch.optim.AdamW(params, lr=lr)

    test_loader = tensor_loader(split.x_test, split.y_test, 512)
    x = split.x_test[:demo.LATENCY_BATCH]
    torch.manual_seed(seed)
    teacher = demo.mlp(demo.TEACHER_WIDTHS, demo.TEACHER_DROPOUT)
    scratch = demo.mlp(demo.STUDENT_WIDTHS)
    start = time.perf_counter()
    train(teacher, train_loader(), teacher_epochs, optimizer=adamw(demo.TEACHER_LR))
    train(scratch, train_loader(), epochs, optimizer=adamw(demo.LR))
    teacher.eval()
    rows = [_row("teacher (full)", teacher, test_loader, x), _row("student (scratch)", scratch, test_loader, x)]
    for cut in cuts:
        width = _feature_width(teacher, cut, x)
        torch.manual_seed(seed)
        head = demo.mlp((width, head_hidden, demo.TEACHER_WIDTHS[-1]))
        d = Distiller(teacher, copy.deepcopy(head), [method("kd", T=demo.KD_T, weight=demo.KD_WEIGHT)],
                      task_weight=demo.TASK_WEIGHT, optimizer=adamw(demo.LR), scheduler=None, student_input=cut,
                      progress=False)
        d.fit(train_loader(), epochs)
        rows.append(_row(f"trunk to {cut} + head", compose(teacher, d.student, at=cut), test_loader, x,
                         cut=cut, feature_width=width))
    return {"dataset": {"name": "digits", "train": len(split.y_train), "test": len(split.y_test)},
            "seed": seed, "epochs": epochs, "teacher_epochs": teacher_epochs, "head_hidden": head_hidden,
            "threads": torch.get_num_threads(), "latency_batch": len(x),
            "train_seconds": time.perf_counter() - start, "rows": rows}


def _feature_width(teacher, cut: str, x) -> int:
    with torch.no_grad():
        return compose(teacher, torch.nn.Identity(), at=cut)(x[:1]).shape[-1]


def _row(name, model, test_loader, x, **extra) -> dict:
    return {"model": name, "parameters": num_parameters(model), "latency_ms": latency_ms(model, x),
            "test_accuracy": evaluate(model, test_loader)["accuracy"], **extra}


def format_table(result: dict) -> str:
    d = result["dataset"]
    lines = [f"head search: 8x8 digits ({d['train']} train / {d['test']} test), seed {result['seed']}, teacher "
             f"{result['teacher_epochs']} epochs, heads (kd from the teacher's logits) and scratch student "
             f"{result['epochs']} epochs, {result['threads']} CPU thread",
             *demo.model_rows(result["rows"], 22)]
    lines.append(f"a head: {result['head_hidden']} hidden units on the cut feature; params and latency are the "
                 f"deployed model's (teacher trunk + head); latency on a batch of {result['latency_batch']}; "
                 f"training took {result['train_seconds']:.1f} s")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillx.experiments.head_search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuts", default=",".join(CUTS), help="teacher layer paths to cut at, comma-separated")
    parser.add_argument("--epochs", type=int, default=50, help="head and scratch-student epochs (default %(default)s)")
    parser.add_argument("--teacher-epochs", type=int, default=demo.TEACHER_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    cuts = [c.strip() for c in args.cuts.split(",") if c.strip()]
    if not cuts:
        parser.error("--cuts needs at least one layer path")
    for name in ("epochs", "teacher_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    with demo.single_thread():
        result = run(cuts, args.epochs, args.seed, args.teacher_epochs)
    demo.publish(format_table(result), result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
