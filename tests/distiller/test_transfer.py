"""Distiller(transfer=...): the student is initialised from the teacher when distillation starts (or on
apply_transfer()), once; the report is kept, a failing transfer leaves the student untouched, and bad
values are clear errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import distillx as dx
from distillx.data import digits_split, tensor_loader
from distillx.distiller import Distiller
from distillx.transfer import TransferError, TransferReport
from distillx.engine.training import evaluate, train


@pytest.fixture(scope="module")
def split():
    return digits_split(test_fraction=0.25, seed=0)


@pytest.fixture(scope="module")
def teacher(split):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    train(model, tensor_loader(split.x_train, split.y_train, 64, shuffle=True, seed=0), epochs=5)
    return model.eval()


def student(seed=3, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_transfer_by_name_selects_teacher_slices(teacher):
    s = student()
    d = Distiller(teacher, s, [dx.method("kd")], transfer="select")
    assert d.transfer_report is None, "nothing happens before distillation starts"
    assert d.apply_transfer() is d.transfer_report
    assert isinstance(d.transfer_report, TransferReport)
    assert d.transfer_report.complete
    # Weight Selection keeps the teacher's output layer rows (10 classes) and a uniform choice of its
    # 64 hidden units: the student's hidden units are teacher units, so its first layer rows are
    # teacher rows and its output weights are the teacher's columns at those units.
    rows = [i for i in range(64) if any(torch.equal(s[0].weight[j], teacher[0].weight[i]) for j in range(16))]
    assert len(rows) == 16, rows
    assert torch.equal(s[2].weight, teacher[2].weight[:, rows])
    assert torch.equal(s[2].bias, teacher[2].bias)


def test_transfer_object_with_options_and_training_runs(split, teacher):
    s = student()
    calib = tensor_loader(split.x_train, split.y_train, 256)
    test = tensor_loader(split.x_test, split.y_test, 512)
    before = evaluate(s, test)["accuracy"]
    d = Distiller(teacher, s, [dx.method("kd")], transfer=dx.transfer("head_fit", calibration=calib))
    d.apply_transfer()
    fitted = evaluate(s, test)["accuracy"]
    assert d.transfer_report.counts().get("fitted", 0) >= 1
    assert fitted > before + 0.2, (before, fitted)   # a fitted head beats a random one by far
    report = d.transfer_report
    history = d.fit(tensor_loader(split.x_train, split.y_train, 64, shuffle=True, seed=0), epochs=2)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert d.transfer_report is report, "fit does not apply the transfer a second time"


def test_fit_applies_the_transfer_before_training(split, teacher):
    s = student()
    d = Distiller(teacher, s, [dx.method("kd")], transfer="direct", scheduler=None,
                  optimizer=lambda params: torch.optim.SGD(params, lr=0.0))   # lr 0: only the transfer moves weights
    d.fit(tensor_loader(split.x_train, split.y_train, 64), epochs=1)
    assert d.transfer_report is not None and d.transfer_report.counts()["copied"] == 1   # the output bias
    assert torch.equal(s[2].bias, teacher[2].bias)


def test_callable_transfer_and_its_return_value_is_checked(teacher):
    seen = []

    def custom(t, s):
        seen.append((t, s))
        return dx.transfer("direct", t, s)

    s = student()
    d = Distiller(teacher, s, [dx.method("kd")], transfer=custom)
    d.apply_transfer()
    assert seen and seen[0][1] is s and d.transfer_report.complete
    with pytest.raises(TypeError, match="TransferReport"):
        Distiller(teacher, student(), [dx.method("kd")], transfer=lambda t, s: None).apply_transfer()


def test_failing_transfer_leaves_student_untouched(teacher):
    s = student()
    before = state(s)
    with pytest.raises(TransferError, match="transferred nothing"):
        Distiller(teacher, s, [dx.method("kd")], transfer=dx.transfer("direct", mapping=lambda name: None)).apply_transfer()
    after = state(s)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("value,error,match", [
    (42, TypeError, "strategy name"),
    ("no_such_strategy", ValueError, "no_such_strategy"),
])
def test_bad_transfer_values(teacher, value, error, match):
    with pytest.raises(error, match=match):
        Distiller(teacher, student(), [dx.method("kd")], transfer=value).apply_transfer()


def test_ensemble_transfer_is_refused(teacher):
    with pytest.raises(ValueError, match="ensemble"):
        Distiller(teacher, student(), [dx.method("kd")],
                  transfer=dx.transfer("distribution", n=3, seed=0)).apply_transfer()
