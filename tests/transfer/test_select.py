"""Weight Selection (``select``) on an MLP, a conv net and a transformer of different widths and depths."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import distillx as dx

from . import helpers
from .models import ConvNet, TinyTransformer, mlp, randomize_norms


def test_mlp_slices_match_independent_selection():
    torch.manual_seed(0)
    teacher, student = mlp((64, 48)), mlp((32, 24))
    report = dx.transfer("select", teacher, student)
    assert report.complete and report.counts()["skipped"] == 0
    for i, shape in ((0, (32, 12)), (2, (24, 32)), (4, (5, 24))):
        torch.testing.assert_close(student[i].weight, helpers.select(teacher[i].weight, shape), rtol=0, atol=0)
        assert report[f"{i}.weight"].how == "select-uniform"
    assert torch.equal(student[4].bias, teacher[4].bias) and report["4.bias"].action == "copied"


def zero_outside(teacher: nn.Sequential, kept: list[list[int]]) -> None:
    """Zero every hidden unit of ``teacher`` not in ``kept`` (per hidden layer), in and out."""
    with torch.no_grad():
        linears = [m for m in teacher if isinstance(m, nn.Linear)]
        for layer, idx in enumerate(kept):
            drop = torch.ones(linears[layer].out_features, dtype=torch.bool)
            drop[idx] = False
            linears[layer].weight[drop] = 0
            linears[layer].bias[drop] = 0
            linears[layer + 1].weight[:, drop] = 0


def test_consistent_selection_reproduces_the_teacher_function():
    # A teacher whose unselected hidden units are dead computes exactly what the selected student
    # computes -- but only if every layer keeps the same units on both sides of each hidden width.
    torch.manual_seed(1)
    teacher = mlp((64, 48))
    zero_outside(teacher, [helpers.uniform(64, 32), helpers.uniform(48, 24)])
    student = mlp((32, 24))
    dx.transfer("select", teacher, student)
    x = torch.randn(16, 12)
    torch.testing.assert_close(student(x), teacher(x), rtol=1e-5, atol=1e-6)


def test_conv_net_selects_channels_and_running_statistics_consistently():
    torch.manual_seed(2)
    teacher, student = randomize_norms(ConvNet(16, 32)), ConvNet(8, 12)
    report = dx.transfer("select", teacher, student)
    assert report.complete and report.counts()["skipped"] == 0
    torch.testing.assert_close(student.conv2.weight, helpers.select(teacher.conv2.weight, (12, 8, 3, 3)),
                               rtol=0, atol=0)
    rows = helpers.uniform(32, 12)
    for name in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(student.bn2, name), getattr(teacher.bn2, name)[rows], rtol=0, atol=0)
    assert report["bn2.running_var"].kind == "buffer"
    torch.testing.assert_close(student.fc.weight, teacher.fc.weight[:, rows], rtol=0, atol=0)
    # with the unselected channels dead, the selected conv net (eval: BN uses the selected stats) is exact
    teacher2 = randomize_norms(ConvNet(16, 32), seed=3)
    keep1, keep2 = helpers.uniform(16, 8), helpers.uniform(32, 12)
    with torch.no_grad():
        for conv, bn, nxt, keep in ((teacher2.conv1, teacher2.bn1, teacher2.conv2, keep1),
                                    (teacher2.conv2, teacher2.bn2, None, keep2)):
            drop = torch.ones(conv.out_channels, dtype=torch.bool)
            drop[keep] = False
            bn.weight[drop] = 0
            bn.bias[drop] = 0
            if nxt is not None:
                nxt.weight[:, drop] = 0
        teacher2.fc.weight[:, torch.tensor([i not in keep2 for i in range(32)])] = 0
    student2 = ConvNet(8, 12)
    dx.transfer("select", teacher2, student2)
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(student2.eval()(x), teacher2.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers,teacher_layers", [("first", [0, 1]), ("uniform", [0, 3])])
def test_transformer_attention_embedding_and_layers(layers, teacher_layers):
    torch.manual_seed(3)
    teacher = randomize_norms(TinyTransformer(dim=32, heads=4, ff=64, layers=4))
    student = TinyTransformer(dim=16, heads=4, ff=32, layers=2)
    report = dx.transfer("select", teacher, student, layers=layers)
    assert report.complete and report.counts()["skipped"] == 0
    for i, j in enumerate(teacher_layers):
        s_layer, t_layer = student.encoder.layers[i], teacher.encoder.layers[j]
        # q, k and v are selected inside their own blocks of the fused (3E, E) projection
        w = t_layer.self_attn.in_proj_weight
        expected = torch.cat([helpers.select(block, (16, 16)) for block in w.chunk(3)])
        torch.testing.assert_close(s_layer.self_attn.in_proj_weight, expected, rtol=0, atol=0)
        torch.testing.assert_close(s_layer.self_attn.in_proj_bias,
                                   torch.cat([b[helpers.uniform(32, 16)] for b in t_layer.self_attn.in_proj_bias.chunk(3)]),
                                   rtol=0, atol=0)
        torch.testing.assert_close(s_layer.linear1.weight, helpers.select(t_layer.linear1.weight, (32, 16)),
                                   rtol=0, atol=0)
        torch.testing.assert_close(s_layer.norm2.weight, t_layer.norm2.weight[helpers.uniform(32, 16)], rtol=0, atol=0)
        assert report[f"encoder.layers.{i}.linear2.weight"].source == f"encoder.layers.{j}.linear2.weight"
    # the embedding keeps every token row and selects the embedding dimension
    torch.testing.assert_close(student.embed.weight, teacher.embed.weight[:, helpers.uniform(32, 16)], rtol=0, atol=0)
    torch.testing.assert_close(student.pos, teacher.pos[:, :, helpers.uniform(32, 16)], rtol=0, atol=0)
    out = student(torch.randint(0, 30, (2, 8)))
    assert out.shape == (2, 4) and torch.isfinite(out).all()


def test_what_cannot_be_selected_is_skipped_with_the_reason():
    torch.manual_seed(4)
    teacher = TinyTransformer(dim=32, layers=2, vocab=30)
    student = TinyTransformer(dim=16, ff=128, layers=3, vocab=20)
    report = dx.transfer("select", teacher, student)
    assert "must match (vocabulary" in report["embed.weight"].reason
    assert "wider than the teacher" in report["encoder.layers.0.linear1.weight"].reason
    assert "has no teacher layer" in report["encoder.layers.2.norm1.weight"].reason
    assert report["head.weight"].action == "adapted"


def test_fused_qkv_linear_declared_with_blocks():
    class Attn(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

    torch.manual_seed(5)
    teacher, student = Attn(8), Attn(4)
    dx.transfer("select", teacher, student, blocks={"qkv.*": 3})
    expected = torch.cat([helpers.select(b, (4, 4)) for b in teacher.qkv.weight.chunk(3)])
    torch.testing.assert_close(student.qkv.weight, expected, rtol=0, atol=0)
    dx.transfer("select", teacher, student)  # without blocks: selection across the concatenation
    assert not torch.equal(student.qkv.weight, expected)
