"""``head_fit`` with NaN/Inf in the calibration data or the weights: a TransferError naming the
non-finite source, never a LAPACK error or a head full of NaN reported as fitted, and the student
left untouched."""
from __future__ import annotations

import pytest
import torch

import distillx as dx
from distillx.transfer import TransferError

from . import helpers
from .models import mlp


def batches(n: int = 3, rows: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 12, generator=g) for _ in range(n)]


def poisoned(value: float, batch: int = 1) -> list:
    data = batches()
    data[batch][3, 5] = value
    return [(x, torch.zeros(len(x), dtype=torch.long)) for x in data]  # (inputs, integer targets)


def check_fails_cleanly(teacher, student, data, match, direct: bool = False):
    """Both through dx.transfer and calling the strategy itself (which has no copy to fall back on)."""
    before = helpers.snapshot(student)
    run = dx.transfer.head_fit if direct else (lambda t, s, **o: dx.transfer("head_fit", t, s, **o))
    with pytest.raises(TransferError, match=match):
        run(teacher, student, calibration=data)
    helpers.assert_unchanged(student, before)


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_calibration_inputs(value, direct):
    torch.manual_seed(0)
    check_fails_cleanly(mlp((16,)), mlp((8,)), poisoned(value),
                        r"calibration inputs of batch 1 contain NaN or Inf", direct)


@pytest.mark.parametrize("direct", [False, True])
def test_non_finite_teacher_weights(direct):
    torch.manual_seed(1)
    teacher = mlp((16,))
    with torch.no_grad():
        teacher[2].weight[0, 0] = float("nan")
    check_fails_cleanly(teacher, mlp((8,)), batches(),
                        r"the teacher's weights are not finite \(NaN or Inf in 2\.weight\).*teacher's logits", direct)


def test_non_finite_student_body():
    torch.manual_seed(2)
    student = mlp((8,))
    with torch.no_grad():
        student[0].bias[1] = float("inf")
    check_fails_cleanly(mlp((16,)), student, batches(),
                        r"the student's weights are not finite \(NaN or Inf in 0\.bias\).*student's features at '2'")


def test_a_nan_student_head_is_simply_refitted():
    """The head's own values are not read (its input is captured before it runs)."""
    torch.manual_seed(3)
    student = mlp((8,))
    with torch.no_grad():
        student[2].weight.fill_(float("nan"))
    report = dx.transfer("head_fit", mlp((16,)), student, calibration=batches())
    assert report.names("fitted") == ["2.weight", "2.bias"] and torch.isfinite(student[2].weight).all()


def test_teacher_logits_that_overflow():
    torch.manual_seed(4)
    teacher = mlp((16,))
    with torch.no_grad():
        teacher[2].weight.fill_(3e38)  # finite weights, logits past float32's range
    check_fails_cleanly(teacher, mlp((8,)), batches(), r"teacher's logits on batch 0 are not finite.*overflows")


def test_normal_equations_that_overflow_float64():
    torch.manual_seed(5)
    teacher, student = mlp((16,)).double(), mlp((8,)).double()
    with torch.no_grad():
        student[0].weight.mul_(1e200)  # features ~1e200: finite, but their squares are not
    check_fails_cleanly(teacher, student, [x.double() for x in batches()], r"normal equations overflowed")
