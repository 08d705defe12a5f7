"""Run by test_ddp.py: distil on the first 512 digits with a global batch of 64, either in one process
(``single``) or under torchrun with 2 ranks of 32 samples each; rank 0 saves the student's weights.
A third argument ``auto`` balances the loss terms (every 3 steps); then every rank also saves its
balancer's state (``<out>.rank<r>``) and rank 0 the factors of every step."""
from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distillx as dx
from distillx.data import digits_split


def main(out: str, world: int, balance=None) -> None:
    torch.set_num_threads(1)
    split = digits_split(0.25, 0)
    x, y = split.x_train[:512], split.y_train[:512]
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    student = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    loader = DataLoader(TensorDataset(x, y), batch_size=64 // world, shuffle=False)
    d = dx.Distiller(teacher, student, [dx.method("kd", T=2.0, weight=0.7), dx.method("sld")],
                     optimizer=lambda p: torch.optim.SGD(p, lr=0.05), scheduler="cosine", warmup=2,
                     checkpoint_dir=out + ".ckpt", progress=False, balance=balance,
                     balance_every=3 if balance else None)
    history = d.fit(loader, 2)
    if balance:
        torch.save(d._step.balancer.state_dict(), f"{out}.rank{d.ctx.rank}")
    if d.ctx.is_main:
        factors = [{k: v for k, v in r.items() if k.startswith("weight/")} for r in d.metrics.steps("student")]
        torch.save({"student": student.state_dict(), "adapters": [m.state_dict() for m in d.methods],
                    "history": history, "world": d.ctx.world_size, "factors": factors}, out)
    if torch.distributed.is_initialized():  # gloo's threads may abort the exit of a group left open
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
