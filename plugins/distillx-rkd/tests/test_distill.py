"""End to end: an MLP teacher distilled into a narrower MLP student with ``dx.method("rkd")``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import distillx
from distillx.data import tensor_loader
from distillx.methods import FeatureShapeError
from distillx_rkd import rkd_loss


def data(n=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()  # 4 classes


def teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 4)).eval()


def student():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))  # penultimate width 8 vs teacher's 32


def penultimate_rkd(t, s, x):
    """The RKD loss on the inputs of the output layers, computed outside the Distiller."""
    with torch.no_grad():
        return rkd_loss(s[:-1](x), t[:-1](x)).item()


def snapshot(model):
    return [p.detach().clone() for p in [*model.parameters(), *model.buffers()]]


def test_rkd_trains_the_student_and_leaves_the_teacher_alone():
    t, s = teacher(), student()
    x, y = data()
    x_eval = data(64, seed=1)[0]
    before_teacher = snapshot(t)
    before = penultimate_rkd(t, s, x_eval)
    d = distillx.Distiller(t, s, [distillx.method("rkd")], task_weight=0.0,
                           optimizer=lambda params: torch.optim.Adam(params, lr=1e-2))
    history = d.fit(tensor_loader(x, y, 32, shuffle=True, seed=0), epochs=6)
    after = penultimate_rkd(t, s, x_eval)
    assert after < 0.6 * before, (before, after)                 # held-out relations got closer
    assert history[-1]["rkd"] < history[0]["rkd"]
    assert history[-1]["loss"] == pytest.approx(history[-1]["rkd"])  # task_weight 0: RKD is the whole loss
    assert all(torch.equal(a, b) for a, b in zip(before_teacher, snapshot(t)))
    assert all(p.grad is None for p in t.parameters())
    assert not t.training


def test_rkd_on_logits_alongside_the_task_loss():
    t, s = teacher(), student()
    x, y = data()
    first = [p.detach().clone() for p in s.parameters()]
    d = distillx.Distiller(t, s, [distillx.method("rkd", feature="logits", weight=0.5)])
    history = d.fit(tensor_loader(x, y, 48), epochs=2)
    assert set(history[0]) >= {"task", "rkd"} and all(torch.isfinite(torch.tensor(h["rkd"])) for h in history)
    assert history[0]["rkd"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(first, s.parameters()))


def test_a_last_batch_of_one_stops_with_a_clear_error():
    x, y = data(33)  # batches of 16, 16, 1
    d = distillx.Distiller(teacher(), student(), [distillx.method("rkd")])
    with pytest.raises(FeatureShapeError, match="method 'rkd': .*at least 3 samples per batch, got a batch of 1"):
        d.fit(tensor_loader(x, y, 16), epochs=1)
