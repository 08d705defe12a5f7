"""Run by test_ddp.py: distil a tiny BERT pair on mapping batches with a global batch of 8, in one
process (world 1) or under torchrun with 2 ranks of 4; rank 0 saves the student's weights."""
from __future__ import annotations

import os
import sys

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import TokenDataset, bert  # noqa: E402

import distillx as dx  # noqa: E402
from distillx.testing import leave_process_group  # noqa: E402


def main(out: str, world: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher, student = bert(4, 32, 4).eval(), bert(2, 16, 4)
    # full-length sequences: a masked mean per rank then equals the global one, so the runs must agree
    loader = DataLoader(TokenDataset(32, 10, padded=False), batch_size=8 // world, shuffle=False)
    methods = [dx.method("minilmv2"), dx.method("sld", student="encoder.layer.-1", teacher="encoder.layer.-1")]
    d = dx.Distiller(teacher, student, methods, optimizer=lambda p: torch.optim.SGD(p, lr=0.5), scheduler=None,
                     checkpoint_dir=out + ".ckpt", progress=False)
    history = d.fit(loader, 2)
    if d.ctx.is_main:
        torch.save({"student": student.state_dict(), "history": history, "world": d.ctx.world_size}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    leave_process_group()  # after main(): its models and Distiller are freed first
