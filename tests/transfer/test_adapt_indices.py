"""Explicit per-dimension indices in :class:`Layout` (what importance pruning hands to ``shrink``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distillx.transfer import Layout, ShapeMismatch, TransferReport, correspond, shrink
from distillx.transfer.apply import copy_or_shrink

from . import helpers


def test_given_indices_replace_the_rule_on_their_dimension_only():
    t = torch.randn(6, 5)
    out, how = shrink(t, (3, 4), "select", Layout(indices={0: [5, 0, 2]}))
    expected = t[[5, 0, 2]][:, helpers.uniform(5, 4)]  # order as given; dim 1 uniform
    assert torch.equal(out, expected)
    assert how == "select-uniform (given indices in dim 0)"


def test_every_shrunk_dimension_indexed_is_reported_as_indexed():
    t = torch.randn(6, 5, 3)
    out, how = shrink(t, (2, 5, 1), None, Layout(indices={0: [1, 4], 2: [2], 1: [0, 1]}))
    assert torch.equal(out, t[[1, 4]][:, :, [2]])  # dim 1 is equal: copied whole, its indices unused
    assert how == "indexed"
    assert shrink(t, (2, 5, 3), "truncate", Layout(indices={0: [0, 3]}))[1] == "indexed"


def test_indices_override_blocks_but_not_keep():
    t = torch.randn(6, 2)
    out, _ = shrink(t, (2, 2), "select", Layout(blocks={0: 2}, indices={0: [1, 2]}))
    assert torch.equal(out, t[[1, 2]])  # both from the first block: the caller chose across blocks
    with pytest.raises(ShapeMismatch, match="must match"):
        shrink(t, (2, 2), "select", Layout(keep={0: "classes"}, indices={0: [1, 2]}))


def test_rule_none_requires_indices_on_every_differing_dimension():
    with pytest.raises(ShapeMismatch, match="dim 1 differs .* no indices"):
        shrink(torch.randn(4, 4), (2, 2), None, Layout(indices={0: [0, 1]}))


@pytest.mark.parametrize("idx, message", [([0], "1 indices given for dim 0"), ([0, 9], r"outside the teacher's 0\.\.3"),
                                          ([1, 1], "repeat")])
def test_malformed_indices_are_value_errors(idx, message):
    with pytest.raises(ValueError, match=message):
        shrink(torch.randn(4, 3), (2, 3), "select", Layout(indices={0: idx}))


def test_copy_or_shrink_takes_indices_per_tensor_and_skips_the_rest_without_a_rule():
    torch.manual_seed(0)
    teacher, student = nn.Sequential(nn.Linear(3, 6), nn.Linear(6, 2)), nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    keep = [0, 2, 3, 5]
    report = TransferReport.for_model("test", student)
    copy_or_shrink(student, correspond(teacher, student), report, None,
                   indices={"0.weight": {0: keep}, "1.weight": {1: keep}})
    assert torch.equal(student[0].weight, teacher[0].weight[keep])
    assert torch.equal(student[1].weight, teacher[1].weight[:, keep])
    assert report["0.weight"].how == "indexed" and report["1.bias"].action == "copied"
    assert report["0.bias"].action == "skipped" and "adapt=None" in report["0.bias"].reason
