"""Index selection, shrinking, layer stacks and the student -> teacher correspondence."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distillx.transfer import (Layout, ShapeMismatch, TransferError, correspond, layer_stacks, layout_of,
                               output_layer, shrink, uniform_indices)

from . import helpers
from .models import ConvNet, TinyTransformer, mlp


@pytest.mark.parametrize("dt,ds", [(64, 32), (48, 24), (10, 3), (7, 5), (4, 3), (5, 5), (9, 1), (100, 37), (3, 7)])
def test_uniform_indices_are_rounded_linspace(dt, ds):
    assert uniform_indices(dt, ds) == helpers.uniform(dt, ds)


def test_uniform_indices_properties():
    idx = uniform_indices(96, 40)
    assert idx[0] == 0 and idx[-1] == 95 and idx == sorted(set(idx))  # ends kept, strictly increasing
    assert uniform_indices(4, 3) == [0, 2, 3]  # 1.5 rounds to even, exactly
    with pytest.raises(ValueError):
        uniform_indices(0, 3)


def test_shrink_select_and_truncate():
    t = torch.arange(8 * 6.0).reshape(8, 6)
    out, how = shrink(t, (4, 3), "select")
    assert how == "select-uniform"
    torch.testing.assert_close(out, t[[0, 2, 5, 7]][:, [0, 2, 5]])
    out, how = shrink(t, (4, 3), "truncate")
    assert how == "truncate" and torch.equal(out, t[:4, :3])


def test_shrink_per_block_keeps_q_k_v_apart():
    t = torch.arange(12.0)  # blocks q=0..3, k=4..7, v=8..11
    out, how = shrink(t, (6,), "select", Layout(blocks={0: 3}))
    assert out.tolist() == [0, 3, 4, 7, 8, 11] and "3 blocks" in how
    out, _ = shrink(t, (6,), "truncate", Layout(blocks={0: 3}))
    assert out.tolist() == [0, 1, 4, 5, 8, 9]


@pytest.mark.parametrize("shape,layout,match", [
    ((4, 8), None, "wider than the teacher"),
    ((4,), None, "2 dimensions, student 1"),
    ((3, 2), Layout(keep={0: "vocabulary"}), "must match .vocabulary"),
    ((5, 2), Layout(blocks={0: 3}), "3 fused blocks"),
])
def test_shrink_refuses_with_a_reason(shape, layout, match):
    with pytest.raises(ShapeMismatch, match=match):
        shrink(torch.zeros(6, 4), shape, "select", layout)


def test_layouts_of_attention_embedding_and_output_layer():
    model = TinyTransformer(layers=1)
    assert layout_of(model, "encoder.layers.0.self_attn.in_proj_weight").blocks == {0: 3}
    assert layout_of(model, "encoder.layers.0.self_attn.in_proj_bias").blocks == {0: 3}
    assert layout_of(model, "encoder.layers.0.self_attn.out_proj.weight").blocks == {}
    assert 0 in layout_of(model, "embed.weight").keep
    assert 0 in layout_of(model, "head.weight", output_layer="head").keep
    assert layout_of(nn.LSTM(4, 8), "weight_hh_l0").blocks == {0: 4}
    assert layout_of(mlp(), "2.weight", blocks={"2.*": 3}).blocks == {0: 3}


def test_layer_stacks_and_output_layer():
    assert layer_stacks(TinyTransformer(layers=3)) == {"encoder.layers": 3}
    assert layer_stacks(mlp()) == {}  # Linear/ReLU alternate: not a stack of one layer type
    assert layer_stacks(nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])) == {"": 4}
    assert output_layer(TinyTransformer()) == "head"  # not the attention's out_proj, not linear2
    assert output_layer(mlp((8, 8))) == "4"
    assert output_layer(nn.Sequential(nn.Conv2d(1, 2, 3))) is None


def by_name(matches):
    return {m.name: m for m in matches}


def test_output_layer_pairs_across_depths_and_is_reserved():
    shallow, deep = mlp((32, 24)), mlp((64, 48, 40))  # heads "4" and "6"
    m = by_name(correspond(deep, shallow))
    assert m["4.weight"].teacher_name == "6.weight" and m["4.weight"].output
    assert m["0.weight"].teacher_name == "0.weight" and m["2.bias"].teacher_name == "2.bias"
    # a deeper student: its hidden "4" must not read the teacher's head "4"
    m = by_name(correspond(mlp((64, 48)), mlp((32, 24, 16))))
    assert m["6.weight"].teacher_name == "4.weight"
    assert m["4.weight"].teacher_name is None and "reserved" in m["4.weight"].reason


def test_layer_rules_first_and_uniform():
    teacher, student = TinyTransformer(layers=5), TinyTransformer(layers=3)
    first = by_name(correspond(teacher, student, layers="first"))
    uniform = by_name(correspond(teacher, student, layers="uniform"))
    key = "encoder.layers.{}.linear1.weight"
    assert [first[key.format(i)].teacher_name for i in range(3)] == [key.format(i) for i in (0, 1, 2)]
    assert [uniform[key.format(i)].teacher_name for i in range(3)] == [key.format(i) for i in (0, 2, 4)]
    deeper = by_name(correspond(TinyTransformer(layers=2), TinyTransformer(layers=3)))
    assert deeper[key.format(2)].teacher_name is None and "has no teacher layer" in deeper[key.format(2)].reason
    with pytest.raises(ValueError, match="layers must be one of"):
        correspond(teacher, student, layers="last")


def test_module_type_guard():
    class A(nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.x = nn.BatchNorm1d(4) if norm else nn.Linear(4, 4)  # x.weight exists in both

    m = by_name(correspond(A(norm=False), A(norm=True)))
    assert m["x.weight"].teacher_name is None and "belongs to a Linear" in m["x.weight"].reason


def test_mapping_tensors_modules_and_callables():
    teacher, student = ConvNet(), ConvNet(8, 16)
    m = by_name(correspond(teacher, student, mapping={"conv1.weight": "conv2.weight", "bn1": "bn2"}))
    assert m["conv1.weight"].teacher_name == "conv2.weight"
    assert m["bn1.running_var"].teacher_name == "bn2.running_var"
    m = by_name(correspond(teacher, student, mapping=lambda n: n if n.startswith("fc") else None))
    assert m["fc.weight"].teacher_name == "fc.weight" and m["conv1.weight"].teacher_name is None


def test_mapping_to_missing_names_lists_close_ones():
    teacher, student = ConvNet(), ConvNet(8, 16)
    with pytest.raises(TransferError, match="teacher has no tensor 'conv1.wieght'.*Close names: conv1.weight"):
        correspond(teacher, student, mapping={"conv1.weight": "conv1.wieght"})
    with pytest.raises(TransferError, match="neither a tensor nor a module of the student.*bn1"):
        correspond(teacher, student, mapping={"bn_1": "bn1"})
    with pytest.raises(TransferError, match="teacher has no module 'bn3'"):
        correspond(teacher, student, mapping={"bn1": "bn3"})
    with pytest.raises(TransferError, match="returned 'nope'"):
        correspond(teacher, student, mapping=lambda n: "nope")
    with pytest.raises(TypeError, match="mapping must be"):
        correspond(teacher, student, mapping=[("a", "b")])


def test_same_type_ordinal_when_dropout_shifts_indices():
    """A teacher Sequential with Dropout after each ReLU (Linears at 0/3/6) and a student without
    (Linears at 0/2/4): the student's k-th Linear reads the teacher's k-th Linear, so a student of the
    teacher's shapes gets every tensor copied; ReLU/Dropout positions never match a Linear."""
    import torch
    from torch import nn

    import distillx as dx
    from distillx.transfer import correspond

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8), nn.ReLU(),
                            nn.Dropout(0.5), nn.Linear(8, 3))
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    pairs = {m.name: m.teacher_name for m in correspond(teacher, student)}
    assert pairs == {"0.weight": "0.weight", "0.bias": "0.bias", "2.weight": "3.weight", "2.bias": "3.bias",
                     "4.weight": "6.weight", "4.bias": "6.bias"}
    report = dx.transfer("direct", teacher, student)
    assert report.counts()["copied"] == 6
    assert torch.equal(student[2].weight, teacher[3].weight) and torch.equal(student[4].bias, teacher[6].bias)
    # no same-type module at that ordinal in the teacher: left alone, with the name rule's reason
    short = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    deep = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3))
    pairs = {m.name: m.teacher_name for m in correspond(short, deep)}
    assert pairs["4.weight"] is None and pairs["6.weight"] == "2.weight"
