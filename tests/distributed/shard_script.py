"""Run by test_sharding.py under torchrun (2 ranks, gloo): shard one loader form with distillx, record
the sample indices each rank sees per epoch, train a tiny student with the Distiller, save both."""
from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

import distillx as dx
from distillx.engine.distributed import init_from_env
from distillx.engine.sharding import set_epoch, shard_loader
from distillx.testing import leave_process_group

N, EPOCHS = 45, 3


class Indexed(Dataset):
    """Item i: inputs holding i in column 0 (so a batch tells which samples it has), a label."""

    def __init__(self, mapping: bool):
        g = torch.Generator().manual_seed(0)
        self.x, self.y, self.mapping = torch.randn(N, 8, generator=g), torch.randint(0, 3, (N,), generator=g), mapping

    def __len__(self):
        return N

    def __getitem__(self, i):
        if isinstance(i, list):  # a BatchSampler as sampler=: one whole batch
            return torch.stack([self._x(j) for j in i]), self.y[i]
        return ({"x": self._x(i), "labels": self.y[i]} if self.mapping else (self._x(i), self.y[i]))

    def _x(self, i):
        return torch.cat([torch.tensor([float(i)]), self.x[i, 1:]])


class EveryOther(Sampler):
    """A custom sampler with its own torch.Generator: a random permutation of the even, then the odd indices."""

    def __init__(self, n, generator):
        self.n, self.generator = n, generator

    def __len__(self):
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist()
        return iter(sorted(order, key=lambda i: i % 2))


def collate_mapping(items):
    return torch.stack([it["x"] for it in items]), torch.stack([it["labels"] for it in items])


def make(form: str) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    if form == "random":
        return DataLoader(Indexed(False), batch_size=4, shuffle=True, generator=g)
    if form == "global_random":
        return DataLoader(Indexed(False), batch_size=4, shuffle=True)
    if form == "sequential":
        return DataLoader(Indexed(False), batch_size=4, sampler=SequentialSampler(range(N)))
    if form == "custom":
        return DataLoader(Indexed(False), batch_size=4, sampler=EveryOther(N, g))
    if form == "batch_sampler":
        return DataLoader(Indexed(False), batch_sampler=BatchSampler(RandomSampler(range(N), generator=g), 4, False))
    if form == "batch_sampler_as_sampler":
        return DataLoader(Indexed(False), batch_size=None,
                          sampler=BatchSampler(RandomSampler(range(N), generator=g), 4, False))
    if form == "mapping":
        return DataLoader(Indexed(True), batch_size=4, shuffle=True, generator=g, collate_fn=collate_mapping)
    raise ValueError(form)


def run(form: str, ctx) -> dict:
    loader = shard_loader(make(form), ctx)
    seen = []
    for epoch in range(EPOCHS):
        set_epoch(loader, epoch)
        seen.append([[int(i) for i in x[:, 0].tolist()] for x, _ in loader])  # the batches of the epoch
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    student = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    d = dx.Distiller(teacher, student, [dx.method("kd", T=2.0)], progress=False, scheduler=None)
    d.fit(make(form), 2)
    head = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 3))  # a student on the teacher's features
    d = dx.Distiller(teacher, head, [dx.method("kd", T=2.0)], student_input="1", progress=False, scheduler=None)
    d.fit(make(form), 2)
    return {"seen": seen, "student": student.state_dict(), "head": head.state_dict()}


def main(out: str, forms: list) -> None:
    torch.set_num_threads(1)
    ctx = init_from_env(torch.device("cpu"))
    torch.save({form: run(form, ctx) for form in forms}, f"{out}.{ctx.rank}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    leave_process_group()  # after main(): its models and Distiller are freed first
