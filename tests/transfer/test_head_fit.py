"""The ``head_fit`` strategy: ridge regression of the student's output layer onto the teacher's logits."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import distillx as dx
from distillx.transfer import TransferError

from . import helpers
from .models import TinyTransformer, mlp


def batches(n: int = 4, rows: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 12, generator=g), torch.randint(0, 5, (rows,), generator=g)) for _ in range(n)]


def test_reproduces_the_teacher_when_the_features_can():
    torch.manual_seed(0)
    teacher = mlp((32, 24))
    student = copy.deepcopy(teacher)
    student[4].reset_parameters()  # same features, re-initialised head
    x = torch.randn(50, 12)
    assert (student(x) - teacher(x)).abs().max() > 0.1
    report = dx.transfer("head_fit", teacher, student, calibration=batches(), ridge=0)
    assert report.names("fitted") == ["4.weight", "4.bias"]
    assert report["4.weight"].how == "least-squares" and "128 rows from 4 batches" in report["4.weight"].reason
    assert report.counts()["skipped"] == 4
    torch.testing.assert_close(student(x), teacher(x), rtol=1e-5, atol=1e-5)
    # identified weights are the teacher's; a dead ReLU unit's column is undetermined, and ridge=0
    # gives the minimum-norm solution: zero there
    with torch.no_grad():
        dead = (student[:4](torch.cat([b[0] for b in batches()])) == 0).all(dim=0)
    assert dead.any() and student[4].weight[:, dead].abs().max() < 1e-6
    torch.testing.assert_close(student[4].weight[:, ~dead], teacher[4].weight[:, ~dead], rtol=1e-4, atol=1e-5)


def test_default_ridge_shrinks_slightly():
    torch.manual_seed(1)
    teacher = mlp((32, 24))
    student = copy.deepcopy(teacher)
    student[4].reset_parameters()
    report = dx.transfer("head_fit", teacher, student, calibration=batches())
    assert report["4.weight"].how.startswith("ridge (lambda=")
    x = torch.randn(50, 12)
    err = (student(x) - teacher(x)).abs().max().item()
    assert 1e-6 < err < 0.05


def test_narrower_student_gets_the_least_squares_head():
    torch.manual_seed(2)
    teacher, student = mlp((64, 48)), mlp((16, 8))
    data = batches(6)
    report = dx.transfer("head_fit", teacher, student, calibration=data, ridge=0)
    # the same solution computed directly: lstsq of [features, 1] onto the teacher's logits
    with torch.no_grad():
        x = torch.cat([b[0] for b in data])
        feats = student[:4](x).double()
        design = torch.cat([feats, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        theta = torch.linalg.lstsq(design, teacher(x).double()).solution
    torch.testing.assert_close(student[4].weight.double(), theta[:8].T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(student[4].bias.double(), theta[8], rtol=1e-4, atol=1e-5)
    r2 = float(report["4.weight"].reason.rsplit("R^2=", 1)[1])
    with torch.no_grad():
        y = teacher(x)
        expected_r2 = 1 - ((student(x) - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert r2 == pytest.approx(expected_r2.item(), abs=1e-4)


def test_batch_formats_max_batches_and_modes_restored():
    torch.manual_seed(3)
    teacher, student = mlp((32,)), mlp((16,))
    teacher.train(), student.eval()

    def stream():
        yield torch.randn(40, 12)  # a bare tensor batch
        yield [torch.randn(40, 12), None]  # (inputs, targets) as a list
        raise AssertionError("max_batches=2 must not pull a third batch")

    report = dx.transfer("head_fit", teacher, student, calibration=stream(), max_batches=2)
    assert "80 rows from 2 batches" in report.notes[0]
    assert teacher.training and not student.training
    report = dx.transfer("head_fit", teacher, student, calibration=torch.randn(30, 12))  # one tensor: one batch
    assert "30 rows from 1 batches" in report.notes[0]


class KwargsModel(nn.Module):
    """Takes keyword inputs and returns a dict, like Hugging Face models."""

    def __init__(self, width):
        super().__init__()
        self.body, self.classifier = nn.Linear(6, width), nn.Linear(width, 3)

    def forward(self, features, mask=None):
        return {"logits": self.classifier(torch.tanh(self.body(features)))}


def test_dict_batches_and_dict_outputs():
    torch.manual_seed(4)
    teacher, student = KwargsModel(10), KwargsModel(10)
    student.body.load_state_dict(teacher.body.state_dict())
    data = [{"features": torch.randn(20, 6), "mask": None} for _ in range(2)]
    dx.transfer("head_fit", teacher, student, calibration=data, ridge=0)
    x = torch.randn(5, 6)
    torch.testing.assert_close(student(x)["logits"], teacher(x)["logits"], rtol=1e-5, atol=1e-5)


def test_transformer_pair_with_named_head():
    torch.manual_seed(5)
    teacher, student = TinyTransformer(dim=32, layers=2), TinyTransformer(dim=16, ff=32, layers=1)
    data = [torch.randint(0, 30, (16, 8)) for _ in range(3)]
    report = dx.transfer("head_fit", teacher, student, calibration=data, head="head")
    assert report.names("fitted") == ["head.weight", "head.bias"]


def test_errors_leave_the_student_unchanged():
    teacher, student = mlp((32,)), mlp((16,))
    before = helpers.snapshot(student)
    with pytest.raises(TransferError, match="no rows .an empty loader"):
        dx.transfer("head_fit", teacher, student, calibration=[])
    with pytest.raises(TransferError, match="needs calibration="):
        dx.transfer("head_fit", teacher, student)
    with pytest.raises(TransferError, match="logits have 7 outputs.*has 5"):
        dx.transfer("head_fit", mlp((32,), classes=7), student, calibration=batches(1))
    with pytest.raises(TransferError, match="'1' is a ReLU, not an nn.Linear"):
        dx.transfer("head_fit", teacher, student, calibration=batches(1), head="1")
    with pytest.raises(TransferError, match="no module 'haed'"):
        dx.transfer("head_fit", teacher, student, calibration=batches(1), head="haed")
    with pytest.raises(ValueError, match="ridge must be a number >= 0"):
        dx.transfer("head_fit", teacher, student, calibration=batches(1), ridge=-1)
    with pytest.raises(TypeError, match="calibration must be an iterable"):
        dx.transfer("head_fit", teacher, student, calibration=3)
    helpers.assert_unchanged(student, before)
