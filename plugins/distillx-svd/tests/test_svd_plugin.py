"""Tests of the svd plugin, run after `pip install --no-build-isolation --no-deps -e ./plugins/distillx-svd`."""
from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch
from torch import nn

import distillx as dx
from distillx.cli import plugins as plugins_cli
from distillx.plugin import get_registries
from distillx.testing import assert_discovered, fresh_plugins  # noqa: F401  (fresh_plugins: autouse)
from distillx_svd import project, svd_transfer


def uniform(dt: int, ds: int) -> list[int]:
    """round(linspace(0, dt - 1, ds)), exact (independent of distillx)."""
    return [0] if ds == 1 else [round(Fraction(k * (dt - 1), ds - 1)) for k in range(ds)]


def mlp(hidden, inputs=12, classes=5):
    layers, width = [], inputs
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, classes))


def singular_values(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.detach().double().reshape(w.shape[0], -1))


# -- discovery -----------------------------------------------------------------------------------
def test_discovered_through_the_entry_point(capsys):
    assert_discovered("transfers", "svd", svd_transfer, entry_point="svd", target="distillx_svd",
                      distribution="distillx-svd", version="0.1.0")
    assert plugins_cli.main(["--json"]) == 0
    listed = {t["name"]: t for t in json.loads(capsys.readouterr().out)["transfers"]}
    assert listed["svd"]["provider"] == "svd" and listed["svd"]["distribution"] == "distillx-svd"
    assert {"direct", "select", "head_fit"} <= set(listed)  # the built-ins are still there


def test_disabled_by_name(monkeypatch):
    monkeypatch.setenv("DISTILLX_DISABLE_PLUGINS", "svd")
    assert "svd" not in get_registries().transfers
    assert "select" in get_registries().transfers


# -- the projection ------------------------------------------------------------------------------
def test_keeps_the_teachers_top_singular_values():
    torch.manual_seed(0)
    teacher, student = mlp((64, 48)), mlp((32, 24))
    report = dx.transfer("svd", teacher, student)
    assert report.complete and report["2.weight"].how == "svd" and report["2.weight"].action == "adapted"
    assert "rank 24" in report["2.weight"].reason
    for i, k in ((0, 12), (2, 24), (4, 5)):
        torch.testing.assert_close(singular_values(student[i].weight), singular_values(teacher[i].weight)[:k])
    # vectors: uniform selection
    torch.testing.assert_close(student[2].bias, teacher[2].bias[uniform(48, 24)], rtol=0, atol=0)
    assert report["4.bias"].action == "copied"
    assert student(torch.randn(3, 12)).shape == (3, 5)


def test_equals_weight_selection_for_a_teacher_living_on_the_selected_coordinates():
    torch.manual_seed(1)
    rows, cols = uniform(20, 6), uniform(16, 8)
    teacher = torch.zeros(20, 16, dtype=torch.float64)
    block = torch.randn(6, 8, dtype=torch.float64)
    teacher[torch.tensor(rows)[:, None], torch.tensor(cols)] = block
    out, k, energy = project(teacher, rows, cols)
    assert k == 6 and energy == pytest.approx(1.0)
    torch.testing.assert_close(out, block)


def test_equal_shapes_give_the_teacher_back_and_are_copied():
    torch.manual_seed(2)
    w = torch.randn(7, 5, dtype=torch.float64)
    out, k, _ = project(w, range(7), range(5))
    torch.testing.assert_close(out, w)
    teacher, student = mlp((16,)), mlp((16,))
    report = svd_transfer(teacher, student)
    assert report.counts()["copied"] == len(report)
    assert torch.equal(student[0].weight, teacher[0].weight)


def test_invariant_to_the_sign_ambiguity_of_the_svd():
    torch.manual_seed(3)
    w = torch.randn(10, 8, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    flip = torch.tensor([1.0, -1, 1, -1, -1, 1, 1, -1], dtype=torch.float64)
    w_flipped = (u * flip) @ torch.diag(s) @ (vh * flip[:, None])  # the same matrix, other SVD signs
    a, _, _ = project(w, uniform(10, 4), uniform(8, 3))
    b, _, _ = project(w_flipped, uniform(10, 4), uniform(8, 3))
    torch.testing.assert_close(a, b)
    again, _, _ = project(w, uniform(10, 4), uniform(8, 3))
    assert torch.equal(a, again)


def test_any_shapes_including_a_wider_student():
    torch.manual_seed(4)
    w = torch.randn(6, 9, dtype=torch.float64)
    out, k, _ = project(w, uniform(6, 10), uniform(9, 4))  # 10 > 6 rows: indices repeat
    assert out.shape == (10, 4) and k == 4
    torch.testing.assert_close(torch.linalg.svdvals(out), torch.linalg.svdvals(w)[:4])


def test_attention_blocks_and_convolutions():
    torch.manual_seed(5)
    teacher = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    student = nn.TransformerEncoderLayer(8, 4, 16, dropout=0.0, batch_first=True)
    report = dx.transfer("svd", teacher, student)
    assert report["self_attn.in_proj_weight"].how == "svd"
    s_blocks = student.self_attn.in_proj_weight.chunk(3)
    for t_block, s_block in zip(teacher.self_attn.in_proj_weight.chunk(3), s_blocks):
        torch.testing.assert_close(singular_values(s_block), singular_values(t_block)[:8])

    conv_t, conv_s = nn.Conv2d(8, 16, 3), nn.Conv2d(4, 6, 3)
    report = svd_transfer(conv_t, conv_s)
    assert report["weight"].how == "svd"
    torch.testing.assert_close(singular_values(conv_s.weight), singular_values(conv_t.weight)[:6])
    report = dx.transfer("svd", nn.Conv2d(8, 16, 5), nn.Conv2d(4, 6, 3), allow_empty=True)
    assert "kernel sizes differ" in report["weight"].reason


def test_output_rows_are_kept_and_mismatches_skipped():
    teacher, student = mlp((32,), classes=5), mlp((16,), classes=3)
    report = dx.transfer("svd", teacher, student)
    assert report["2.weight"].action == "skipped" and "must match (output layer" in report["2.weight"].reason
