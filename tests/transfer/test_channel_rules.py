"""The graph rules of channel_groups one by one: what joins spaces, what passes them, what fixes them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distillx.transfer import TransferError
from distillx.transfer.channels import channel_groups, channel_importance

from .models import ConvNet

IMG = torch.randn(2, 3, 8, 8)


def members(plan, name, dim=0):
    return set(plan.space_of(name, dim).members)


class Branches(nn.Module):
    def __init__(self, cat=True):
        super().__init__()
        self.a, self.b, self.cat = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), cat
        self.c = nn.Conv2d(8 if cat else 4, 5, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return self.c(torch.cat([a, b], 1) if self.cat else a - b)


def test_cat_fixes_its_inputs_and_sub_joins_them():
    plan = channel_groups(Branches(cat=True), IMG)
    assert "cat" in plan.space_of("a.weight", 0).fixed and "cat" in plan.space_of("b.weight", 0).fixed
    assert plan.space_of("a.weight", 0) is not plan.space_of("b.weight", 0)
    joined = channel_groups(Branches(cat=False), IMG)
    assert members(joined, "a.weight") == {("a.weight", 0), ("a.bias", 0), ("b.weight", 0), ("b.bias", 0),
                                           ("c.weight", 1)}
    assert joined.space_of("a.weight", 0).fixed is None


class Mobile(nn.Module):
    """pointwise -> depthwise -> grouped, each with BatchNorm and ReLU."""

    def __init__(self):
        super().__init__()
        self.pw, self.bn1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 6, 1, groups=2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.pw(x)))
        return self.grouped(torch.relu(self.bn2(self.dw(x))))


def test_a_depthwise_conv_keeps_its_input_space_and_a_grouped_conv_fixes_both_sides():
    plan = channel_groups(Mobile(), IMG)
    bn = {(f"{p}.{t}", 0) for p in ("bn1", "bn2") for t in ("weight", "bias", "running_mean", "running_var")}
    space = plan.space_of("pw.weight", 0)
    assert set(space.members) == {("pw.weight", 0), ("pw.bias", 0), ("dw.weight", 0), ("dw.bias", 0)} | bn
    assert "2-group" in space.fixed
    assert "2-group" in plan.space_of("grouped.weight", 0).fixed
    assert plan.space_of("grouped.weight", 1) is None  # 4 = 8 / 2 inputs per group: no channel space


class SqueezeExcite(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(c, c // 2), nn.Linear(c // 2, c)
        self.gamma = nn.Parameter(torch.ones(c, 1, 1))
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return self.head(x * s.view(x.size(0), -1, 1, 1) * self.gamma)


def test_squeeze_excite_joins_the_gate_and_a_layer_scale_becomes_a_member():
    plan = channel_groups(SqueezeExcite(), IMG)
    assert members(plan, "conv.weight") == {("conv.weight", 0), ("conv.bias", 0), ("fc1.weight", 1), ("fc2.weight", 0),
                                            ("fc2.bias", 0), ("gamma", 0), ("head.weight", 1)}
    assert plan.space_of("conv.weight", 0).fixed is None
    assert members(plan, "fc1.weight") == {("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)}


def test_mean_over_positions_passes_the_space_to_the_head():
    plan = channel_groups(ConvNet(4, 6), IMG)
    assert ("fc.weight", 1) in members(plan, "conv2.weight")


class Tokens(nn.Module):
    """(N, L, F) features: Linear reads the last dim, LayerNorm normalises it; transposing fixes."""

    def __init__(self, act=True, transpose=False):
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)
        self.act, self.transpose = act, transpose

    def forward(self, x):
        h = self.norm(self.up(x))
        h = torch.relu(h) if self.act else h
        return self.down(h.transpose(1, 2).transpose(1, 2) if self.transpose else h)


@pytest.mark.parametrize("act, kind", [(True, "activation"), (False, "norm")])
def test_measurement_points_prefer_activations_then_norms(act, kind):
    plan = channel_groups(Tokens(act=act), torch.randn(2, 5, 4))
    space = plan.space_of("up.weight", 0)
    assert set(space.members) == {("up.weight", 0), ("up.bias", 0), ("norm.weight", 0), ("norm.bias", 0),
                                  ("down.weight", 1)}
    assert [(p[1], p[2]) for p in space.points] == [(2, kind)]
    scores = channel_importance(Tokens(act=act), plan, [torch.randn(3, 5, 4)])
    assert scores[space.index].shape == (6,)


def test_producers_are_measured_when_a_space_has_nothing_else():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    space = channel_groups(model, torch.randn(2, 4)).space_of("0.weight", 0)
    assert [p[2] for p in space.points] == ["producer"]


def test_transpose_and_unknown_modules_fix_what_they_read():
    plan = channel_groups(Tokens(transpose=True), torch.randn(2, 5, 4))
    assert "transpose" in plan.space_of("up.weight", 0).fixed
    gn = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1))
    assert "GroupNorm" in channel_groups(gn, IMG).space_of("0.weight", 0).fixed


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


def test_an_untraceable_model_is_a_clear_error():
    with pytest.raises(TransferError, match=r"cannot trace Branchy with torch\.fx .*TraceError: .*control flow"):
        channel_groups(Branchy(), torch.randn(2, 4))


def test_keyword_example_inputs_and_restored_modes():
    model = ConvNet(4, 6).train()
    model.bn1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    channel_groups(model, {"x": IMG})
    channel_importance(model, channel_groups(model, IMG), [{"x": IMG, "labels": torch.zeros(2)}])
    assert model.training and not model.bn1.training and model.bn2.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # eval: no running-stat update
