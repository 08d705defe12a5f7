"""The ``direct`` strategy on real module pairs."""
from __future__ import annotations

import pytest
import torch

import distillx as dx

from . import helpers
from .models import ConvNet, mlp


def test_mlp_pair_equal_shapes_copied_wider_truncated():
    torch.manual_seed(0)
    teacher, student = mlp((64, 48)), mlp((64, 24))
    report = dx.transfer("direct", teacher, student)
    assert report.complete
    t = teacher.state_dict()
    s = student.state_dict()
    # layer 0 has the same shape in both: copied exactly
    assert report["0.weight"].action == "copied" and torch.equal(s["0.weight"], t["0.weight"])
    # layer 2 is (48, 64) in the teacher, (24, 64) in the student: the leading rows
    assert report["2.weight"].action == "adapted" and report["2.weight"].how == "truncate"
    assert report["2.weight"].source_shape == (48, 64)
    torch.testing.assert_close(s["2.weight"], t["2.weight"][:24], rtol=0, atol=0)
    torch.testing.assert_close(s["4.weight"], t["4.weight"][:, :24], rtol=0, atol=0)
    assert torch.equal(s["4.bias"], t["4.bias"])
    assert report.counts()["skipped"] == 0
    assert student(torch.randn(3, 12)).shape == (3, 5)


def test_adapt_select_and_none():
    torch.manual_seed(1)
    teacher = mlp((64, 48))
    student = mlp((32, 24))
    report = dx.transfer("direct", teacher, student, adapt="select")
    assert report["2.weight"].how == "select-uniform"
    torch.testing.assert_close(student[2].weight, helpers.select(teacher[2].weight, (24, 32)), rtol=0, atol=0)

    student = mlp((32, 24))
    before = helpers.snapshot(student)
    report = dx.transfer("direct", teacher, student, adapt=None)
    assert report.names("skipped") == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight"]
    assert "adapt=None" in report["0.weight"].reason
    assert torch.equal(student[4].bias, teacher[4].bias)
    assert torch.equal(student[0].weight, before["0.weight"])


def test_output_layer_is_transferred_across_names_and_depths():
    torch.manual_seed(2)
    teacher, student = mlp((64, 48, 40)), mlp((32,))  # heads: teacher "6" (5, 40), student "2" (5, 32)
    report = dx.transfer("direct", teacher, student)
    assert report["2.weight"].source == "6.weight" and report["2.weight"].reason.startswith("output layer")
    torch.testing.assert_close(student[2].weight, teacher[6].weight[:, :32], rtol=0, atol=0)
    assert torch.equal(student[2].bias, teacher[6].bias)
    # a student head wider than the teacher's (64 > 40) cannot be truncated: skipped, with the reason
    report = dx.transfer("direct", teacher, mlp((64,)))
    assert report["2.weight"].action == "skipped" and "wider than the teacher" in report["2.weight"].reason
    assert report["2.bias"].action == "copied"


def test_conv_pair_with_mapping_and_batchnorm_statistics():
    torch.manual_seed(3)
    teacher, student = ConvNet(16, 32), ConvNet(16, 8)
    teacher.bn1.running_mean.normal_()
    report = dx.transfer("direct", teacher, student, mapping={"bn2": "bn1"})
    assert report["bn1.running_mean"].action == "copied"
    assert torch.equal(student.bn1.running_mean, teacher.bn1.running_mean)
    assert report["bn2.running_mean"].source == "bn1.running_mean"
    torch.testing.assert_close(student.bn2.running_mean, teacher.bn1.running_mean[:8], rtol=0, atol=0)
    torch.testing.assert_close(student.conv2.weight, teacher.conv2.weight[:8], rtol=0, atol=0)
    assert student(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_bad_adapt_option():
    with pytest.raises(ValueError, match="adapt='slice' is not one of"):
        dx.transfer("direct", mlp(), mlp(), adapt="slice")
