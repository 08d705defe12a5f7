"""What a method's loss() returns is checked by the step before it is weighted and summed: a
floating-point scalar tensor (shape (), or (1,), which is taken as the scalar), connected to the
student's graph when gradients are on and the student has trainable parameters. Anything else is an
error naming the method and what it returned (a float, None, a vector, an int tensor or a detached
tensor gave raw errors, or trained nothing)."""
from __future__ import annotations

import re

import pytest
import torch

import distillx as dx
from distillx.demo import mlp
from distillx.methods import Method
from distillx.testing import data, loader

BAD = {  # what loss() returns -> (error type, what the message says was returned)
    "float": (lambda s, t: 0.5, TypeError, r"returned a float \(0\.5\)"),
    "none": (lambda s, t: None, TypeError, r"returned None"),
    "vector": (lambda s, t: (s - t).pow(2).mean(1), ValueError, r"returned a tensor of shape \(16,\)"),
    "int": (lambda s, t: (s > t).sum(), TypeError, r"returned a tensor of dtype torch\.int64"),
    "detached": (lambda s, t: (s - t).pow(2).mean().detach(), ValueError,
                 r"returned a tensor that does not require grad"),
    "no-grad": (lambda s, t: _under_no_grad(s, t), ValueError, r"returned a tensor that does not require grad"),
}


def _under_no_grad(s, t):
    with torch.no_grad():
        return (s - t).pow(2).mean()


class Returns(Method):
    """A plugin method whose loss() returns ``fn(student logits, teacher logits)``."""
    name = "returns"
    options = {"fn": None}

    def loss(self, student, teacher, batch=None):
        return self.fn(student["logits"], teacher["logits"])


def _distiller(fn, student=None):
    torch.manual_seed(0)
    teacher = mlp((64, 32, 10)).eval()
    # An optimizer that also builds for a student with nothing to train.
    sgd = lambda params: torch.optim.SGD(list(params) or [torch.zeros(1, requires_grad=True)], lr=0.1)  # noqa: E731
    return dx.Distiller(teacher, student or mlp((64, 16, 10)), [Returns(fn=fn)], optimizer=sgd, progress=False)


def _batch(n=16):
    x, y, _, _ = data(64)
    return x[:n], y[:n]


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_loss_is_named_with_what_it_returned(case):
    """Distiller.losses (the training step's computation) and fit stop with an error naming the method
    ('returns', its class) and what loss() returned against what was expected."""
    fn, error, found = BAD[case]
    d = _distiller(fn)
    expected = "expected a floating-point scalar tensor"
    with pytest.raises(error, match=rf"^method 'returns' \(Returns\)\.loss\(\) {found}.*; {expected}"):
        d.losses(_batch())
    if case in ("float", "detached"):
        x, y, _, _ = data(64)
        with pytest.raises(error, match=r"^method 'returns' \(Returns\)\.loss\(\) returned"):
            d.fit(loader(x, y, 32, seed=0), 1)


@pytest.mark.parametrize("case", ["detached", "no-grad"])
def test_no_graph_is_fine_without_gradients_or_trainable_parameters(case):
    """A loss without a graph is legitimate under torch.no_grad (evaluation of the terms) and for a
    student with nothing to train: the value is returned as computed."""
    fn = BAD[case][0]
    d = _distiller(fn)
    with torch.no_grad():
        terms = d.losses(_batch())
    assert terms["returns"].shape == () and not terms["returns"].requires_grad
    frozen = mlp((64, 16, 10)).requires_grad_(False)
    terms = _distiller(fn, frozen).losses(_batch())
    assert terms["returns"].shape == () and torch.isfinite(terms["returns"])


def test_a_one_element_vector_is_taken_as_the_scalar():
    """Shape (1,) (e.g. torch.stack of one term) is accepted and becomes a 0-dim term with its graph;
    (1, 1) or (2,) are not."""
    d = _distiller(lambda s, t: (s - t).pow(2).mean().reshape(1))
    terms = d.losses(_batch())
    assert terms["returns"].shape == () and terms["loss"].shape == () and terms["returns"].requires_grad
    terms["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    for shape in ((1, 1), (2,)):
        d = _distiller(lambda s, t, shape=shape: (s - t).pow(2).mean().expand(shape))
        with pytest.raises(ValueError, match=re.escape(f"returned a tensor of shape {shape}")):
            d.losses(_batch())
