"""Run by test_ddp.py: distil on the first 512 digits with a global batch of 64, either in one process
(``single``) or under torchrun with 2 ranks of 32 samples each; rank 0 saves the student's weights.
A third argument ``auto`` balances the loss terms (every 3 steps); then every rank also saves its
balancer's state (``<out>.rank<r>``) and rank 0 the factors of every step. A logger registered by a
plugin (``"per_rank"``) writes ``<out>.logger.rank<r>`` when it is built: only rank 0 may build it."""
from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distillx as dx
from distillx.data import digits_split
from distillx.testing import leave_process_group


class PerRankLogger:
    """Writes the steps it received to ``<out>.logger.rank<RANK>`` (created when it is built)."""

    def __init__(self, run_dir=None, out=None):
        self.path, self.steps = f"{out}.logger.rank{os.environ.get('RANK', '0')}", []
        open(self.path, "w").close()

    def log_step(self, phase, step, values):
        self.steps.append(step)

    def log_epoch(self, phase, epoch, values):
        pass

    def close(self):
        with open(self.path, "w") as f:
            json.dump(self.steps, f)


class Plugin:
    @dx.plugin.hookimpl
    def distillx_register_loggers(self, registry):
        registry.add("per_rank", PerRankLogger)


def main(out: str, world: int, balance=None) -> None:
    torch.set_num_threads(1)
    dx.plugin.get_plugin_manager().register(Plugin(), "per-rank-logger")
    split = digits_split(0.25, 0)
    x, y = split.x_train[:512], split.y_train[:512]
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    student = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    loader = DataLoader(TensorDataset(x, y), batch_size=64 // world, shuffle=False)
    d = dx.Distiller(teacher, student, [dx.method("kd", T=2.0, weight=0.7), dx.method("sld")],
                     optimizer=lambda p: torch.optim.SGD(p, lr=0.05), scheduler="cosine", warmup=2,
                     checkpoint_dir=out + ".ckpt", progress=False, balance=balance,
                     balance_every=3 if balance else None, loggers=[{"name": "per_rank", "out": out}])
    history = d.fit(loader, 2)
    d.close()
    if balance:
        torch.save(d._step.balancer.state_dict(), f"{out}.rank{d.ctx.rank}")
    if d.ctx.is_main:
        factors = [{k: v for k, v in r.items() if k.startswith("weight/")} for r in d.metrics.steps("student")]
        torch.save({"student": student.state_dict(), "adapters": [m.state_dict() for m in d.methods],
                    "history": history, "world": d.ctx.world_size, "factors": factors}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
    leave_process_group()  # after main(): its models and Distiller are freed first
