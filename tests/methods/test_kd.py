"""The built-in `kd` method (Hinton logit distillation)."""
from __future__ import annotations

import pytest
import torch

import distillx
from distillx.methods import KD
from distillx.ops.reference import kd_loss_reference


def outputs(logits):
    return {"logits": logits}


@pytest.mark.parametrize("divergence, beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)])
def test_matches_reference(divergence, beta):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(8, 11, generator=g, dtype=torch.float64)
    t = torch.randn(8, 11, generator=g, dtype=torch.float64)
    got = KD(T=2.5, divergence=divergence, beta=beta)(outputs(s), outputs(t), None)
    want = kd_loss_reference(s, t, temperature=2.5, divergence=divergence, beta=beta, reduction="batchmean")
    torch.testing.assert_close(got, want)
    assert got.item() > 0


def test_calls_functional_kd_loss_with_its_options(monkeypatch):
    calls = []

    def spy(student_logits, teacher_logits, **kwargs):
        calls.append((student_logits, teacher_logits, kwargs))
        return torch.tensor(1.5)

    monkeypatch.setattr(distillx.functional, "kd_loss", spy)
    s, t = torch.randn(2, 3), torch.randn(2, 3)
    assert KD(T=3.0, divergence="jsd", beta=0.25)(outputs(s), outputs(t), "batch").item() == 1.5
    (cs, ct, kwargs), = calls
    assert cs is s and ct is t
    assert kwargs == dict(temperature=3.0, divergence="jsd", beta=0.25, reduction="batchmean", mask=None)


def test_defaults_and_factory():
    assert KD().config() == {"weight": 1.0, "T": 4.0, "divergence": "kl", "beta": 0.5}
    m = distillx.method("kd", T=2.0, weight=0.9)
    assert isinstance(m, KD) and (m.T, m.weight) == (2.0, 0.9)


@pytest.mark.parametrize("options, option", [
    (dict(T=0), "T"), (dict(T=-1.0), "T"), (dict(T="4"), "T"),
    (dict(divergence="js"), "divergence"), (dict(beta=0.0), "beta"), (dict(beta=1.0), "beta"),
    (dict(weight=-1), "weight"),
])
def test_invalid_options(options, option):
    with pytest.raises(ValueError, match=f"option {option} "):
        KD(**options)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(TypeError, match="unknown option 'temperature'; valid options: T, beta, divergence, weight"):
        distillx.method("kd", temperature=2.0)


def test_missing_logits():
    with pytest.raises(KeyError, match=r"teacher\['logits'\]"):
        KD()(outputs(torch.randn(2, 3)), {}, None)


def test_gradient_flows_to_student_only():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    KD()(outputs(s), outputs(t), None).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_identical_logits_give_zero_loss():
    s = torch.randn(3, 7, dtype=torch.float64)
    for divergence in ("kl", "reverse_kl", "jsd"):
        assert KD(divergence=divergence)(outputs(s), outputs(s.clone()), None).item() == pytest.approx(0, abs=1e-12)
