"""Loss terms that balance themselves: fixed weights (``balance=None``) against ``balance="auto"``, on a
real sentence encoder and on the digits demo.

Run::

    python -m distillx.experiments.balance_table [--steps 200] [--shapes deep,narrow] [--digits-epochs 150]
        [--digits-seeds 0,1,2,3,4] [--parts encoder,digits] [--overhead-steps 30] [--jobs 2]
        [--json PATH [--resume]]

It prints the README's table (markdown) and, with ``--json``, writes every measurement (and each
encoder run as it ends to ``PATH.rows.jsonl``, which ``--resume`` reuses after an interruption).
``--jobs``: processes for the encoder runs; each run is single-threaded and seeded, so the numbers
do not depend on it.

Protocol
--------
**Encoder** (:mod:`distillx.experiments.encoder`): all-MiniLM-L6-v2 distilled into a 2-layer student
(``deep``: the teacher's width, initialised with ``dx.transfer("layer_map", map=[0, 5])``, the
teacher's first and last layers; ``narrow``: width 256, initialised with ``"select"``) for
``--steps`` batches of 32 sentences, AdamW lr 1e-4, no task loss. The terms, each at weight 1.0:

- **MSE**: ``sld`` on the mean-pooled last hidden states (:data:`~distillx.experiments.encoder.POOLED`;
  through a linear adapter when the widths differ);
- **SP**: ``sp`` (Gram matching, Tung & Mori 2019) on the same pooled embeddings;
- **MiniLMv2**: ``minilmv2`` (Q-Q/K-K/V-V self-attention relations of the last layers).

Every row starts from the same student initialisation and sees the same batches. Fidelity:
Spearman's rho between the student's and the teacher's pairwise cosine similarities of 256
held-out sentences.

**Digits** (:mod:`distillx.demo`): the demo's teacher (64-256-256-10, 60 epochs) and student
(64-32-10), AdamW lr 1e-2 without a schedule, ``--digits-epochs`` epochs, no task loss; the terms
``kd`` (the demo's, T=2), ``sld`` and ``kfd`` (both on the penultimate features, RBF kernel for
``kfd``), each at weight 1.0. Test accuracy on the seed's held-out quarter, averaged over the seeds
(one test image is 0.22 points, more than the goal's tolerance, so one seed decides nothing).

For each combination of terms: the run with ``balance=None`` and with ``balance="auto"`` (the
primary term is the first one listed; "MSE + SP" and "SP + MSE" differ only in that). A single term
is not balanced (``"auto"`` is then bitwise the ``None`` run, which ``tests/distiller/test_balance.py``
checks), so single terms are run once. "best single" is the best of the combination's terms trained
alone; the goal is that ``"auto"`` is never more than 0.01 rho (0.2 accuracy points) below it.

**Overhead**: ``--overhead-steps`` steps of MSE + MiniLMv2 on the deep student, ``None`` and
``"auto"`` alternated twice, the faster of each kept (seconds per step); and the number of extra
backward passes each run made (a measurement with N active terms makes N - 1).

Everything runs on one CPU thread with fixed seeds.
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Optional, Sequence

import torch

from .. import demo
from ..data import digits_split, tensor_loader
from ..distiller import Distiller
from ..engine.training import evaluate, train
from ..plugin import method, transfer
from ..reporting.metrics import WEIGHT_PREFIX
from . import encoder

ENCODER_ROWS = (("MSE",), ("SP",), ("MiniLMv2",), ("MSE", "SP"), ("SP", "MSE"), ("MSE", "MiniLMv2"))
DIGITS_ROWS = (("kd",), ("sld",), ("kfd",), ("kd", "sld", "kfd"))
BALANCES = (None, "auto")
STEPS, DIGITS_EPOCHS, OVERHEAD_STEPS = 200, 150, 30
DIGITS_SEEDS = (0, 1, 2, 3, 4)  # 450 test images: one image is 0.22 points, more than the goal's 0.2
TOLERANCE = {"encoder": 0.01, "digits": 0.002}  # rho; accuracy (0.2 points)


def encoder_method(name: str):
    if name == "MSE":
        return method("sld", **encoder.POOLED)
    if name == "SP":
        return method("sp", **encoder.POOLED)
    return method("minilmv2")


def digits_method(name: str):
    if name == "kd":
        return method("kd", T=demo.KD_T, weight=demo.KD_WEIGHT)
    return method(name)


def initialise(teacher, shape: str):
    """The student of ``shape``, random from seed 0, then its weight transfer from the teacher."""
    student = encoder.make_student(teacher, shape)
    if shape == "deep":
        transfer("layer_map", teacher, student, map=[0, 5])
    else:
        transfer("select", teacher, student)
    return student


def factors_of(distiller: Distiller, phase: str = "student") -> dict:
    """Per term: the mean and the last of its logged factors."""
    steps = distiller.metrics.steps(phase)
    keys = [k for k in (steps[0] if steps else {}) if k.startswith(WEIGHT_PREFIX)]
    return {k[len(WEIGHT_PREFIX):]: {"mean": statistics.fmean(r[k] for r in steps), "last": steps[-1][k]}
            for k in keys}


def extra_passes(distiller: Distiller) -> int:
    """The backward passes a run made beyond one per step: N - 1 per measurement of N active terms."""
    b = distiller._step.balancer
    return 0 if b is None else b.extra_backward_passes


_LOADED: dict = {}  # per process: the teacher, its tokenizer, the corpus and the teacher's similarities


def _encoder_setup():
    if not _LOADED:
        teacher, tokenizer = encoder.load_teacher()
        pool, held = encoder.corpus()
        sims = encoder.pairwise_cosine(encoder.embeddings(teacher, held, tokenizer))
        _LOADED.update(teacher=teacher, tokenizer=tokenizer, pool=pool, held=held, sims=sims)
    return _LOADED


def encoder_row(shape: str, combo: Sequence[str], balance: Optional[str], steps: int) -> dict:
    """One encoder run (a fresh student of ``shape``, its transfer, ``steps`` steps) and its fidelity."""
    torch.set_num_threads(1)
    e = _encoder_setup()
    student = initialise(e["teacher"], shape)
    out = encoder.distil(e["teacher"], student, [encoder_method(n) for n in combo],
                         encoder.train_loader(e["pool"], e["tokenizer"], steps), balance=balance)
    d = out["distiller"]
    d.close()
    return {"part": "encoder", "shape": shape, "terms": list(combo), "balance": balance,
            "score": encoder.fidelity(student, e["sims"], e["held"], e["tokenizer"]),
            "seconds": out["seconds"], "factors": factors_of(d), "extra_backward": extra_passes(d)}


def _key(row: dict) -> tuple:
    return (row["part"], row["shape"], tuple(row["terms"]), row["balance"], row.get("seed"))


class RowLog:
    """Finished rows appended to a JSON-lines file (``<json>.rows.jsonl``) as they come, so an
    interrupted run continues with ``--resume`` where it stopped (each row is deterministic)."""

    def __init__(self, path: Optional[str], resume: bool, settings: dict):
        self.path, self.settings, self.done = path, settings, {}
        if path and resume and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    row = json.loads(line)
                    if row.pop("settings", None) == settings:
                        self.done[_key(row)] = row
        elif path and os.path.exists(path):
            os.unlink(path)

    def add(self, row: dict) -> dict:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({**row, "settings": self.settings}) + "\n")
        return row


def run_encoder(shapes: Sequence[str], steps: int, jobs: int = 1, log: Optional[RowLog] = None) -> list[dict]:
    """Every (shape, combination, balance) run; ``jobs`` > 1 runs them in that many processes (each
    on one thread and deterministic, so the numbers do not depend on ``jobs``)."""
    log = log or RowLog(None, False, {})
    tasks = [(shape, combo, balance, steps) for shape in shapes for combo in ENCODER_ROWS
             for balance in (BALANCES if len(combo) > 1 else (None,))]
    keys = [("encoder", shape, tuple(combo), balance, None) for shape, combo, balance, _ in tasks]
    todo = [t for t, k in zip(tasks, keys) if k not in log.done]
    if jobs == 1:
        for t in todo:
            log.done[keys[tasks.index(t)]] = log.add(encoder_row(*t))
    elif todo:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(encoder_row, *t): keys[tasks.index(t)] for t in todo}
            for future in as_completed(futures):
                log.done[futures[future]] = log.add(future.result())
    return [log.done[k] for k in keys]


def overhead(steps: int) -> dict:
    """Seconds per step of MSE + MiniLMv2 on the deep student, without and with balancing (best of two)."""
    e = _encoder_setup()
    initial = initialise(e["teacher"], "deep")
    best: dict = {}
    for _ in range(2):
        for balance in BALANCES:
            out = encoder.distil(e["teacher"], copy.deepcopy(initial),
                                 [encoder_method("MSE"), encoder_method("MiniLMv2")],
                                 encoder.train_loader(e["pool"], e["tokenizer"], steps), balance=balance)
            key = "none" if balance is None else balance
            best[key] = min(best.get(key, float("inf")), out["seconds"] / steps)
            out["distiller"].close()
    return {"steps": steps, "seconds_per_step": best, "overhead": best["auto"] / best["none"] - 1}


def run_digits(seeds: Sequence[int], epochs: int) -> list[dict]:
    rows = []
    for seed in seeds:
        split = digits_split(demo.TEST_FRACTION, seed)

        def loader():
            return tensor_loader(split.x_train, split.y_train, demo.BATCH_SIZE, shuffle=True, seed=seed)

        test = tensor_loader(split.x_test, split.y_test, 512)
        torch.manual_seed(seed)  # as demo.run: the teacher, then the student, from the seed
        teacher = demo.mlp(demo.TEACHER_WIDTHS, demo.TEACHER_DROPOUT)
        initial = demo.mlp(demo.STUDENT_WIDTHS)
        train(teacher, loader(), demo.TEACHER_EPOCHS, optimizer=lambda p: torch.optim.AdamW(p, lr=demo.TEACHER_LR))
        teacher.eval()
        for combo in DIGITS_ROWS:
            for balance in BALANCES if len(combo) > 1 else (None,):
                student = copy.deepcopy(initial)
                start = time.perf_counter()
                with Distiller(teacher, student, [digits_method(n) for n in combo], task_weight=0.0,
                               optimizer=lambda p: torch.optim.AdamW(p, lr=demo.LR), scheduler=None, progress=False,
                               balance=balance) as d:
                    d.fit(loader(), epochs)
                rows.append({"part": "digits", "shape": "64-32-10", "seed": seed, "terms": list(combo),
                             "balance": balance, "score": evaluate(student, test)["accuracy"],
                             "seconds": time.perf_counter() - start, "factors": factors_of(d),
                             "extra_backward": extra_passes(d)})
    return rows


def summarise(rows: Sequence[dict]) -> list[dict]:
    """One line per (part, shape, combination): the score per balance (mean over digits seeds), the
    best single term and the gap of ``"auto"`` to it."""
    def score(part, shape, terms, balance):
        found = [r["score"] for r in rows if (r["part"], r["shape"], r["terms"], r["balance"]) ==
                 (part, shape, list(terms), balance)]
        return statistics.fmean(found) if found else None

    lines = []
    for part in ("encoder", "digits"):
        for shape in dict.fromkeys(r["shape"] for r in rows if r["part"] == part):
            for combo in dict.fromkeys(tuple(r["terms"]) for r in rows if (r["part"], r["shape"]) == (part, shape)):
                none = score(part, shape, combo, None)
                if none is None:
                    continue
                auto = none if len(combo) == 1 else score(part, shape, combo, "auto")
                singles = [score(part, shape, (t,), None) for t in combo]
                best = max(s for s in singles if s is not None) if any(s is not None for s in singles) else None
                gap = None if best is None or auto is None else auto - best
                lines.append({"part": part, "shape": shape, "terms": list(combo), "none": none, "auto": auto,
                              "best_single": best, "auto_minus_best": gap,
                              "meets_goal": None if gap is None else gap >= -TOLERANCE[part]})
    return lines


def run(parts: Sequence[str] = ("encoder", "digits"), shapes: Sequence[str] = ("deep",), steps: int = STEPS,
        digits_seeds: Sequence[int] = DIGITS_SEEDS, digits_epochs: int = DIGITS_EPOCHS,
        overhead_steps: int = OVERHEAD_STEPS, jobs: int = 1, log: Optional[RowLog] = None) -> dict:
    start = time.perf_counter()
    rows: list[dict] = []
    if "encoder" in parts:
        rows += run_encoder(shapes, steps, jobs, log)
    if "digits" in parts:
        rows += run_digits(digits_seeds, digits_epochs)
    cost = overhead(overhead_steps) if "encoder" in parts and overhead_steps else None
    return {"experiment": "balance_table", "steps": steps, "shapes": list(shapes), "digits_epochs": digits_epochs,
            "digits_seeds": list(digits_seeds), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "rows": rows, "summary": summarise(rows), "overhead": cost,
            "wall_seconds": time.perf_counter() - start}


def _num(value: Optional[float], part: str, signed: bool = False) -> str:
    if value is None:
        return ""
    if part == "digits":
        return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def format_table(result: dict) -> str:
    """Markdown: one line per combination of terms; encoder fidelity in rho, digits accuracy in %."""
    lines = [f"Encoder: all-MiniLM-L6-v2 -> 2 layers, {result['steps']} steps of 32 sentences, fidelity (Spearman rho "
             f"of pairwise similarities, 256 held-out sentences). Digits: {result['digits_epochs']} epochs, test "
             f"accuracy in %, mean over seeds {', '.join(map(str, result['digits_seeds']))}. Every term at weight 1.0; "
             f"primary term of \"auto\": the first listed. {result['threads']} CPU thread.", "",
             "| task | student | terms | balance=None | balance=\"auto\" | best single term | auto - best single |"
             " factors of \"auto\" (mean over steps) |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for s in result["summary"]:
        part = s["part"]
        factors = ""
        if len(s["terms"]) > 1:
            auto = [r for r in result["rows"] if (r["part"], r["shape"], r["terms"], r["balance"])
                    == (part, s["shape"], s["terms"], "auto")]
            if auto:
                factors = ", ".join(f"{k} {v['mean']:.2f}" for k, v in auto[0]["factors"].items()
                                    if k not in ("task",) or len(auto[0]["factors"]) == 1)
        auto = _num(s["auto"], part) + (" (one term: not balanced)" if len(s["terms"]) == 1 else "")
        lines.append(f"| {part} | {s['shape']} | {' + '.join(s['terms'])} | {_num(s['none'], part)} | {auto} | "
                     f"{_num(s['best_single'], part)} | {_num(s['auto_minus_best'], part, True)} | {factors} |")
    cost = result.get("overhead")
    if cost:
        sec = cost["seconds_per_step"]
        lines += ["", f"Overhead (deep, MSE + MiniLMv2, {cost['steps']} steps, best of 2): {sec['none']:.3f} s/step "
                      f"without, {sec['auto']:.3f} s/step with balance=\"auto\" ({100 * cost['overhead']:+.1f} %)."]
    passes = [(r["terms"], r["extra_backward"]) for r in result["rows"] if r["balance"] == "auto"]
    if passes:
        lines.append("Extra backward passes per run: " + "; ".join(
            f"{' + '.join(t)}: {n}" for t, n in dict((tuple(t), n) for t, n in passes).items()) + ".")
    lines += ["", f"wall time {result['wall_seconds']:.0f} s"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillx.experiments.balance_table",
                                     description="balance=None vs balance='auto' on a real encoder and on digits "
                                                 "(see the module docstring).")
    parser.add_argument("--parts", default="encoder,digits", help="encoder and/or digits (default %(default)s)")
    parser.add_argument("--shapes", default="deep", help="encoder students: deep and/or narrow (default %(default)s)")
    parser.add_argument("--steps", type=int, default=STEPS, help="encoder steps (default %(default)s)")
    parser.add_argument("--digits-epochs", type=int, default=DIGITS_EPOCHS, help="default %(default)s")
    parser.add_argument("--digits-seeds", default=",".join(map(str, DIGITS_SEEDS)),
                        help="comma-separated (default %(default)s)")
    parser.add_argument("--overhead-steps", type=int, default=OVERHEAD_STEPS,
                        help="steps of the overhead timing, 0 to skip (default %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="processes for the encoder runs (default %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement as JSON to PATH (and each "
                                                          "encoder run, as it ends, to PATH.rows.jsonl)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the encoder runs PATH.rows.jsonl holds for the same settings")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    shapes = [s for s in args.shapes.split(",") if s]
    if not parts or any(p not in ("encoder", "digits") for p in parts):
        parser.error(f"--parts: encoder and/or digits, got {args.parts!r}")
    if any(s not in encoder.SHAPES for s in shapes):
        parser.error(f"--shapes: {' and/or '.join(encoder.SHAPES)}, got {args.shapes!r}")
    for name in ("steps", "digits_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.overhead_steps < 0:
        parser.error("--overhead-steps must be >= 0")
    try:
        seeds = [int(s) for s in args.digits_seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--digits-seeds: comma-separated integers, got {args.digits_seeds!r}")
    if args.resume and not args.json:
        parser.error("--resume needs --json PATH (the runs are kept in PATH.rows.jsonl)")
    log = RowLog(args.json + ".rows.jsonl" if args.json else None, args.resume, {"steps": args.steps})
    with demo.single_thread():
        result = run(parts, shapes, args.steps, seeds, args.digits_epochs, args.overhead_steps, args.jobs, log)
    demo.publish(format_table(result), result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
