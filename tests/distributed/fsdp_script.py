"""Run by test_fsdp.py: distil a small transformer student on random token data with strategy
"ddp" or "fsdp" (2 ranks under torchrun, or 1 process), optionally interrupted and resumed."""
from __future__ import annotations

import os
import signal
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import distillx as dx
from distillx.engine import TrainingInterrupted
from distillx.testing import TinyTransformer, leave_process_group


class InterruptAt:
    """Cross-entropy; sends SIGINT to this process on its ``at``-th call (on rank 0 only)."""

    def __init__(self, at):
        self.calls, self.at = 0, at

    def __call__(self, logits, targets):
        self.calls += 1
        if self.calls == self.at and int(os.environ.get("RANK", "0")) == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return F.cross_entropy(logits, targets)


def main(strategy: str, out: str, interrupt_at: int, resume: bool) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, 8, generator=g), torch.randint(0, 5, (64,), generator=g)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    loader = DataLoader(TensorDataset(x, y), batch_size=16 // world, shuffle=True, generator=g)
    torch.manual_seed(0)
    teacher = TinyTransformer(dim=32, depth=2).eval()
    torch.manual_seed(1 if not resume else 99)  # a resumed run gets its weights from the checkpoint
    student = TinyTransformer(dim=16, depth=2)
    d = dx.Distiller(teacher, student, [dx.method("kd", T=2.0), dx.method("sld", student="encoder.layers.1",
                                                                          teacher="encoder.layers.1")],
                     task_loss=InterruptAt(interrupt_at), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                     scheduler=None, strategy=strategy, checkpoint_dir=out + ".ckpt", progress=False, seed=0)
    try:
        d.fit(loader, 3, resume=True if resume else None)
    except TrainingInterrupted:
        pass
    steps = [m["loss"] for m in d.metrics.steps("student")]
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )
    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
        if strategy == "fsdp" and world > 1 else {k: v.detach().clone() for k, v in student.state_dict().items()}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"student": full, "history": d.history, "steps": steps}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume")
    leave_process_group()  # after main(): its models and Distiller are freed first
