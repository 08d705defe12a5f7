"""The ``layer_map`` strategy (DistilBERT-style layer initialisation)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import distillx as dx
from distillx.transfer import TransferError
from distillx.transfer.layer_map import default_map, every_map

from . import helpers
from .models import TinyTransformer, mlp


def test_the_default_map_keeps_the_first_and_the_last_layer():
    """Measured against DistilBERT's every other layer (README: weight transfer table)."""
    assert default_map(6, 12) == [0, 2, 4, 7, 9, 11]
    assert default_map(2, 4) == [0, 3]
    assert default_map(3, 3) == [0, 1, 2]
    assert every_map(6, 12) == [0, 2, 4, 6, 8, 10] and every_map(2, 4) == [0, 2]


def test_same_width_half_depth_copies_every_other_layer():
    torch.manual_seed(0)
    teacher, student = TinyTransformer(layers=4), TinyTransformer(layers=2)
    report = dx.transfer("layer_map", teacher, student, map="every")
    assert report.counts() == {"copied": len(report), "adapted": 0, "sampled": 0, "fitted": 0, "skipped": 0}
    for i, j in enumerate([0, 2]):
        for (name, s), (_, t) in zip(student.encoder.layers[i].state_dict().items(),
                                     teacher.encoder.layers[j].state_dict().items()):
            assert torch.equal(s, t), name
    assert any("teacher layer [0, 2]" in note for note in report.notes)
    x = torch.randint(0, 30, (2, 8))
    assert student(x).shape == (2, 4)


def test_explicit_map_and_narrower_student_adapted_with_select():
    torch.manual_seed(1)
    teacher = TinyTransformer(dim=32, ff=64, layers=4)
    student = TinyTransformer(dim=16, ff=32, layers=2)
    report = dx.transfer("layer_map", teacher, student, map=[3, 1])
    assert report["encoder.layers.0.linear1.weight"].source == "encoder.layers.3.linear1.weight"
    assert report["encoder.layers.0.linear1.weight"].how == "select-uniform"
    torch.testing.assert_close(student.encoder.layers[1].linear2.weight,
                               helpers.select(teacher.encoder.layers[1].linear2.weight, (16, 32)), rtol=0, atol=0)
    report = dx.transfer("layer_map", teacher, student, map={"encoder.layers": [0, 0]}, adapt="truncate")
    torch.testing.assert_close(student.encoder.layers[1].linear1.weight,
                               teacher.encoder.layers[0].linear1.weight[:32, :16], rtol=0, atol=0)


@pytest.mark.parametrize("layer_map,match", [
    ([0, 1, 2], "has 3 entries but the student has 2 layers"),
    ([0, 4], r"map\[1\] = 4 .* is not a teacher layer \(0..3\)"),
    ({"encoder.layer": [0, 1]}, "not a stack of layers.*Close names: encoder.layers"),
])
def test_bad_maps(layer_map, match):
    teacher, student = TinyTransformer(layers=4), TinyTransformer(layers=2)
    before = helpers.snapshot(student)
    with pytest.raises(TransferError, match=match):
        dx.transfer("layer_map", teacher, student, map=layer_map)
    helpers.assert_unchanged(student, before)


def test_needs_a_stack_of_layers():
    with pytest.raises(TransferError, match="no stack of layers"):
        dx.transfer("layer_map", mlp(), mlp())


def test_stacks_at_different_paths_through_a_module_mapping():
    class Net(nn.Module):
        def __init__(self, n, path):
            super().__init__()
            setattr(self, path, nn.ModuleList(nn.Linear(4, 4) for _ in range(n)))

    torch.manual_seed(2)
    teacher, student = Net(6, "blocks"), Net(3, "layers")
    report = dx.transfer("layer_map", teacher, student, mapping={"layers": "blocks"}, map="every")
    assert [report[f"layers.{i}.weight"].source for i in range(3)] == [f"blocks.{j}.weight" for j in (0, 2, 4)]
    assert torch.equal(student.layers[2].bias, teacher.blocks[4].bias)
