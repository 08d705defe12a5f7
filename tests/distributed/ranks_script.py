"""Run by test_agreement.py under torchrun with 2 gloo ranks: a Distiller whose ``strategy`` is
``$RANK1_STRATEGY`` on rank 1 ("ddp" on rank 0) runs ``fit``; each rank prints ``REFUSED <the
error>``, or ``TRAINED``.
"""
from __future__ import annotations

import os
import sys

import torch

import distillx as dx
from distillx.engine.distributed import RanksDisagree, init_from_env
from distillx.testing import data, loader, student, teacher


def disagree(ctx) -> None:
    torch.set_num_threads(1)
    x, y, _, _ = data(128)
    strategy = os.environ["RANK1_STRATEGY"] if ctx.rank == 1 else "ddp"
    d = dx.Distiller(teacher(), student(), [dx.method("kd", T=2.0)], strategy=strategy, progress=False)
    try:
        d.fit(loader(x, y, batch_size=32, seed=0), 1)
    except RanksDisagree as exc:
        print(f"REFUSED {exc}", flush=True)
        return
    print("TRAINED", flush=True)


def main(mode: str) -> None:
    ctx = init_from_env(torch.device("cpu"))
    try:
        disagree(ctx)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
