"""Distiller(student_input=PATH): a student that consumes the teacher's features.

Each method works on top (loss down, teacher untouched); the teacher stops at the cut unless a method
needs more of it; with a cache the teacher's forward never runs after the cache is built; resume with
a cache is bitwise; bad inputs are named.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distillx as dx
from distillx.demo import mlp
from distillx.engine import TrainingInterrupted
from distillx.features import CutError, FeaturePathError
from distillx.testing import CNN, data, loader, same, snapshot, state, unchanged


def trained_teacher(seed=0):
    torch.manual_seed(seed)
    x, y, _, _ = data(256)
    teacher = mlp((64, 64, 64, 10))
    dx.engine.train(teacher, loader(x, y, 64, seed=0), 3)
    return teacher.eval()


def calls(module: nn.Module) -> list:
    count: list = []
    module.register_forward_hook(lambda m, a, o: count.append(1))
    return count


@pytest.mark.parametrize("methods, task_weight, needs_whole_teacher", [
    ([("kd", {"T": 2.0})], 0.0, True),
    ([("sld", {"student": "0", "teacher": "3"})], 1.0, True),           # a teacher layer after the cut
    ([("kfd", {"student": "1", "teacher": "3", "kernel": "rbf"})], 1.0, True),
    ([("sp", {"student": "1", "teacher": "3"})], 1.0, True),
    ([], 1.0, False),                                                    # the task loss alone: trunk only
])
def test_every_method_trains_a_head_on_the_teachers_features(methods, task_weight, needs_whole_teacher):
    teacher = trained_teacher()
    before = snapshot(teacher)
    torch.manual_seed(1)
    head = mlp((64, 32, 10))
    x, y, xv, yv = data(256)
    tail = calls(teacher[4])  # the teacher's output layer: after the cut "2"
    d = dx.Distiller(teacher, head, [dx.method(n, **o) for n, o in methods], task_weight=task_weight,
                     student_input="2", optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), scheduler=None,
                     progress=False)
    history = d.fit(loader(x, y, 32, seed=0), 6, loader(xv, yv, 256, shuffle=False))
    assert history[-1]["loss"] < 0.8 * history[0]["loss"], history
    assert unchanged(teacher, before)
    # the whole teacher ran on the training batches (its logits or its layer 3 were needed), or its
    # layers after the cut never ran at all (the task loss alone needs only the trunk)
    assert (len(tail) > 0) == needs_whole_teacher, len(tail)
    # validation and evaluate run the teacher's trunk and the head, not the head on raw inputs
    with torch.no_grad():
        expected = head(teacher[:3](xv[:8]))
        assert torch.equal(d.composed(xv[:8]), expected)
    assert d.evaluate(loader(xv, yv, 256, shuffle=False))["accuracy"] == history[-1]["val_accuracy"]


def test_with_a_cache_the_teacher_never_runs_after_the_cache_is_built(tmp_path):
    teacher = trained_teacher()
    torch.manual_seed(1)
    x, y, _, _ = data(256)
    body = calls(teacher[0])
    d = dx.Distiller(teacher, mlp((64, 32, 10)), [dx.method("kd", T=2.0)], task_weight=0.0, student_input="2",
                     cache_teacher=True, cache_dir=str(tmp_path / "cache"), cache_dtype="float32", progress=False)
    d.fit(loader(x, y, 64, seed=0), 1)
    after_build = len(body)
    assert after_build > 0  # the cache build ran the teacher once over the data (plus the setup batch)
    history = d.fit(loader(x, y, 64, seed=0), 3)
    assert len(body) == after_build and len(history) == 3
    assert sorted(d._step.cache.keys()) == ["logits", "student_input"]


class InterruptAt:
    """A task loss that sends SIGINT to this process on its ``at``-th call (cross-entropy otherwise)."""

    def __init__(self, at=None):
        self.calls, self.at = 0, at

    def __call__(self, logits, targets):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return F.cross_entropy(logits, targets)


def _cached_run(tmp_path, name, interrupt_at=None, resume=None, seed=1):
    x, y, _, _ = data(256)
    teacher = trained_teacher()
    torch.manual_seed(seed)
    head = mlp((64, 32, 10))
    d = dx.Distiller(teacher, head, [dx.method("kd", T=2.0)], task_weight=0.5, task_loss=InterruptAt(interrupt_at),
                     student_input="2", cache_teacher=True, cache_dir=str(tmp_path / "cache"), cache_dtype="float32",
                     checkpoint_dir=str(tmp_path / name), progress=False, seed=0)
    if resume:
        torch.manual_seed(1234)  # a different process state: everything must come from the checkpoint
    d.fit(loader(x, y, 32, seed=3), 3, resume=resume)
    return state(head)


def test_resume_with_a_cache_is_bitwise(tmp_path):
    whole = _cached_run(tmp_path, "whole")
    with pytest.raises(TrainingInterrupted):
        _cached_run(tmp_path, "cut", interrupt_at=13)  # epoch 1, step 5 of 8
    resumed = _cached_run(tmp_path, "cut", resume=True, seed=7)  # other initial weights: restored
    assert same(whole, resumed)


def test_bad_inputs_are_named():
    teacher = trained_teacher()
    with pytest.raises(FeaturePathError, match="student_input='nope'.*no module at path 'nope'"):
        dx.Distiller(teacher, mlp((64, 10)), student_input="nope", progress=False)
    x, y, _, _ = data(64)
    d = dx.Distiller(teacher, mlp((16, 10)), student_input="2", progress=False)  # the feature is 64 wide
    with pytest.raises(ValueError, match=r"student_input='2': the student cannot take the teacher's feature there, "
                                         r"of shape \(64, 64\)"):
        d.fit(loader(x, y, 64, seed=0), 1)
    cnn = CNN().eval()
    cnn.unused = nn.Linear(3, 3)  # never called by CNN.forward
    d = dx.Distiller(cnn, nn.Linear(3, 10), [dx.method("kd")], student_input="unused", progress=False)
    xi, yi = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    with pytest.raises(CutError, match="the forward pass never called layer 'unused'"):
        d.fit([(xi, yi)], 1)
    with pytest.raises(FeaturePathError, match="unknown student layer 'layer9'"):
        dx.Distiller(teacher, mlp((64, 10)), [dx.method("sld", student="layer9", teacher="3")], student_input="2",
                     progress=False)
    with pytest.raises(TypeError, match="student_input must be a teacher layer path"):
        dx.Distiller(teacher, mlp((64, 10)), student_input=2, progress=False)


def test_augmentations_and_bf16_autocast_on_top():
    teacher = trained_teacher()
    before = snapshot(teacher)
    torch.manual_seed(1)
    x, y, _, _ = data(256)
    d = dx.Distiller(teacher, mlp((64, 32, 10)), [dx.method("kd", T=2.0)], task_weight=0.0, student_input="2",
                     augmentations=[{"name": "noise", "std": 0.05}], amp="bf16",
                     optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), scheduler=None, progress=False)
    history = d.fit(loader(x, y, 32, seed=0), 4)
    assert history[-1]["loss"] < 0.8 * history[0]["loss"] and unchanged(teacher, before)
    with pytest.raises(ValueError, match="augmentations that change the inputs"):
        dx.Distiller(teacher, mlp((64, 10)), [dx.method("kd")], student_input="2", cache_teacher=True,
                     augmentations=["noise"], progress=False)


class Pair(nn.Module):
    """A layer whose output is a tuple (or a list) of two tensors: the feature and a per-row summary."""

    def __init__(self, as_list=False):
        super().__init__()
        self.lin, self.as_list = nn.Linear(64, 64), as_list

    def forward(self, x):
        h = self.lin(x)
        return [h, h.sum(1)] if self.as_list else (h, h.sum(1))


class First(nn.Module):
    def forward(self, pair):
        return pair[0]


class PairTeacher(nn.Module):
    """Not a Sequential (a graph trunk), or with data-dependent control flow that torch.fx cannot trace
    (a stopped trunk)."""

    def __init__(self, as_list=False, untraceable=False):
        super().__init__()
        self.enc, self.head, self.untraceable = Pair(as_list), nn.Linear(64, 10), untraceable

    def forward(self, x):
        if self.untraceable and bool(x.sum() > 1e9):
            x = x * 0
        return self.head(self.enc(x)[0])


@pytest.mark.parametrize("as_list", [False, True], ids=["tuple", "list"])
@pytest.mark.parametrize("kind", ["slice", "graph", "stop"])
def test_a_cut_whose_output_is_a_tuple_names_it_and_the_index_form(kind, as_list):
    """student_input at a layer returning a tuple/list (the student is called on one tensor; it got a raw
    TypeError from Sequential.forward): an error saying what the output is and suggesting "<layer>:0",
    which then trains, in all three kinds of trunk."""
    torch.manual_seed(0)
    if kind == "slice":
        teacher, cut = nn.Sequential(nn.Linear(64, 64), Pair(as_list), First(), nn.Linear(64, 10)).eval(), "1"
    else:
        teacher, cut = PairTeacher(as_list, untraceable=kind == "stop").eval(), "enc"
    x, y, _, _ = data(64)
    d = dx.Distiller(teacher, mlp((64, 32, 10)), [dx.method("kd")], student_input=cut, progress=False)
    kind_name = "list" if as_list else "tuple"
    with pytest.raises(ValueError, match=rf"^student_input='{cut}': the teacher's layer '{cut}' outputs a {kind_name} "
                                         rf"of 2 elements \(a Tensor of shape \(32, 64\), a Tensor of shape \(32,\)\), "
                                         rf"but the student takes one tensor: use student_input='{cut}:0'"):
        d.fit(loader(x, y, 32, seed=0), 1)
    d = dx.Distiller(teacher, mlp((64, 32, 10)), [dx.method("kd")], student_input=f"{cut}:0", progress=False)
    assert d.fit(loader(x, y, 32, seed=0), 1) and d._step.trunk.kind == ("graph" if kind == "slice" else kind)


def test_a_student_taking_whole_inputs_may_consume_a_tuple():
    """A student that declares distillx_whole_inputs = True is called on the tuple as it is (as the
    composed model calls it), so a tuple cut is not refused for it."""
    class PairHead(nn.Module):
        distillx_whole_inputs = True

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(65, 10)

        def forward(self, pair):
            return self.lin(torch.cat([pair[0], pair[1][:, None]], 1))

    torch.manual_seed(0)
    teacher, head = PairTeacher().eval(), PairHead()
    x, y, xv, _ = data(64)
    d = dx.Distiller(teacher, head, [dx.method("kd")], student_input="enc", progress=False)
    d.fit(loader(x, y, 32, seed=0), 1)
    with torch.no_grad():
        assert torch.equal(d.composed(xv[:8]), head(teacher.enc(xv[:8])))
