"""Run by test_gkd_ddp.py under torchrun (2 ranks, gloo): ``gkd`` with lmbda=0.5, every rank sampling
its own completions; every rank saves its student, its sampling generator's state and the on-policy
flag of each of its steps to ``<out>.rank<r>``."""
from __future__ import annotations

import os
import sys

import torch
from torch.utils.data import DataLoader

import distillx as dx
from distillx.testing import leave_process_group

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf.chat_batches import ChatDataset  # noqa: E402
from hf.models import llama  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = llama(layers=2, hidden=48).eval()
    student = llama(layers=1, hidden=32)
    loader = DataLoader(ChatDataset(16), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    d = dx.Distiller(teacher, student, [dx.method("gkd", lmbda=0.5, max_new_tokens=4)], task_weight=0.0, seed=0,
                     optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), checkpoint_dir=out + ".ckpt", progress=False)
    history = d.fit(loader, 2)
    torch.save({"student": student.state_dict(), "generator": d._step.generator.get_state(), "history": history,
                "on_policy": [s["gkd/on_policy"] for s in d.metrics.steps("student")] if d.ctx.is_main else None,
                "world": d.ctx.world_size}, f"{out}.rank{d.ctx.rank}")


if __name__ == "__main__":
    main(sys.argv[1])
    leave_process_group()  # after main(): its models and Distiller are freed first
