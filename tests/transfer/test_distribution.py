"""The ``distribution`` strategy: fitted statistics, seeds and ensembles."""
from __future__ import annotations

import math

import pytest
import torch

import distillx as dx
from distillx.transfer import EnsembleMember, TransferError

from . import helpers
from .models import ConvNet, TinyTransformer, mlp


def pair(classes: int = 100):
    torch.manual_seed(0)
    teacher, student = mlp((256,), classes=classes), mlp((128,), classes=classes)
    with torch.no_grad():
        teacher[2].weight.normal_(0.05, 0.2)
        teacher[2].weight += 0.02 * torch.arange(classes, dtype=torch.float32)[:, None]  # per-row offsets
        teacher[2].bias.normal_(-0.3, 0.5)
    return teacher, student


def test_samples_the_output_layer_with_the_teachers_normalised_statistics():
    teacher, student = pair()
    before = helpers.snapshot(student)
    report = dx.transfer("distribution", teacher, student, seed=0)
    assert report.names("sampled") == ["2.weight", "2.bias"]
    assert report["2.weight"].seed == 0 and "fan-in normalised" in report["2.weight"].distribution
    assert torch.equal(student[0].weight, before["0.weight"])  # everything else untouched
    # in fan-in-normalised units w*sqrt(fan_in) the student's weights have the teacher's mean and std
    t = teacher[2].weight * math.sqrt(256)
    s = student[2].weight * math.sqrt(128)
    n = s.numel()
    assert abs(s.mean() - t.mean()) < 4 * t.std() / math.sqrt(n)
    assert s.std().item() == pytest.approx(t.std().item(), rel=0.03)
    b_t, b_s = teacher[2].bias, student[2].bias
    assert abs(b_s.mean() - b_t.mean()) < 4 * b_t.std() / math.sqrt(100)  # biases: raw values
    assert b_s.std().item() == pytest.approx(b_t.std().item(), rel=0.3)
    assert not torch.equal(b_s, b_t)


def test_raw_statistics_without_fan_in_scaling():
    teacher, student = pair()
    dx.transfer("distribution", teacher, student, seed=1, scale=None)
    t, s = teacher[2].weight, student[2].weight
    assert abs(s.mean() - t.mean()) < 4 * t.std() / math.sqrt(s.numel())
    assert s.std().item() == pytest.approx(t.std().item(), rel=0.03)


def test_per_row_keeps_each_rows_statistics():
    teacher, student = pair()
    report = dx.transfer("distribution", teacher, student, seed=2, per="row")
    assert "per row (100 rows" in report["2.weight"].distribution
    t = teacher[2].weight * math.sqrt(256)
    s = student[2].weight * math.sqrt(128)
    row_std = t.std(dim=1)
    assert ((s.mean(dim=1) - t.mean(dim=1)).abs() < 5 * row_std / math.sqrt(128)).all()
    # per tensor would not: the rows' means spread far more than a row's sampling noise
    dx.transfer("distribution", teacher, student, seed=2, per="tensor")
    s = student[2].weight * math.sqrt(128)
    assert not ((s.mean(dim=1) - t.mean(dim=1)).abs() < 5 * row_std / math.sqrt(128)).all()


def test_same_seed_same_student_different_seed_different():
    teacher, _ = pair()
    a, b, c = (mlp((128,), classes=100) for _ in range(3))
    dx.transfer("distribution", teacher, a, seed=7)
    dx.transfer("distribution", teacher, b, seed=7)
    dx.transfer("distribution", teacher, c, seed=8)
    assert torch.equal(a[2].weight, b[2].weight) and torch.equal(a[2].bias, b[2].bias)
    assert not torch.equal(a[2].weight, c[2].weight)


def test_seed_none_is_recorded_and_replays():
    teacher, student = pair()
    report = dx.transfer("distribution", teacher, student)
    seed = report["2.weight"].seed
    assert isinstance(seed, int) and f"seed={seed}" in report.notes
    again = mlp((128,), classes=100)
    dx.transfer("distribution", teacher, again, seed=seed)
    assert torch.equal(again[2].weight, student[2].weight)


def test_ensemble_of_new_students():
    teacher, student = pair()
    before = helpers.snapshot(student)
    members = dx.transfer("distribution", teacher, student, n=4, seed=0)
    assert isinstance(members, list) and len(members) == 4
    assert all(isinstance(m, EnsembleMember) for m in members)
    helpers.assert_unchanged(student, before)  # the template is not modified
    assert len({id(m.student) for m in members} | {id(student)}) == 5
    assert [m.report["2.weight"].seed for m in members] == [0, 1, 2, 3]
    heads = [m.student[2].weight for m in members]
    assert all(not torch.equal(heads[i], heads[j]) for i in range(4) for j in range(i + 1, 4))
    assert all(torch.equal(m.student[0].weight, before["0.weight"]) for m in members)
    single = mlp((128,), classes=100)
    dx.transfer("distribution", teacher, single, seed=0)
    assert torch.equal(single[2].weight, heads[0])  # member i is the single transfer with seed + i
    students = [s for s, _ in dx.transfer("distribution", teacher, student, n=2)]
    assert not torch.equal(students[0][2].weight, students[1][2].weight)


def test_params_all_and_named_on_a_transformer():
    torch.manual_seed(3)
    teacher, student = TinyTransformer(dim=32, layers=2), TinyTransformer(dim=16, ff=32, layers=2)
    report = dx.transfer("distribution", teacher, student, params=["encoder.layers.1.linear1", "embed"], seed=0)
    assert report.names("sampled") == ["embed.weight", "encoder.layers.1.linear1.weight",
                                       "encoder.layers.1.linear1.bias"]
    report = dx.transfer("distribution", teacher, student, params="all", seed=0)
    assert report.counts()["sampled"] == len(report)
    conv = dx.transfer("distribution", ConvNet(), ConvNet(8, 16), params="all", seed=0)
    assert "running statistics are not sampled" in conv["bn1.running_var"].reason


def test_bad_options():
    teacher, student = pair()
    with pytest.raises(TransferError, match="params names 'fc'.*"):
        dx.transfer("distribution", teacher, student, params=["fc"])
    with pytest.raises(ValueError, match="per='column'"):
        dx.transfer("distribution", teacher, student, per="column")
    with pytest.raises(TypeError, match="seed must be an int"):
        dx.transfer("distribution", teacher, student, seed="0")
    with pytest.raises(TypeError, match="takes no seed"):
        dx.transfer("select", teacher, student, n=2)
    with pytest.raises(ValueError, match="n must be a positive int"):
        dx.transfer("distribution", teacher, student, n=0)
    with pytest.raises(TransferError, match="no nn.Linear output layer"):
        dx.transfer("distribution", torch.nn.Conv2d(1, 2, 3), torch.nn.Conv2d(1, 2, 3))
