"""Tests of the example plugin, run after `pip install ./plugins/distillx-example`."""
from __future__ import annotations


import pytest
import torch

import distillx
from distillx.plugin import get_plugin_manager, get_registries
from distillx.testing import assert_discovered, fresh_plugins  # noqa: F401  (fresh_plugins: autouse)
from distillx_example import CosineLogits


def test_discovered_through_entry_point():
    assert_discovered("methods", "cosine_logits", CosineLogits, entry_point="example", target="distillx_example",
                      distribution="distillx-example-plugin", version="0.1.0")
    assert isinstance(distillx.method("cosine_logits", center=True), CosineLogits)


def test_disabled_by_name(monkeypatch):
    monkeypatch.setenv("DISTILLX_DISABLE_PLUGINS", "example")
    assert "cosine_logits" not in get_registries().methods
    assert "example" in get_plugin_manager().disabled
    assert "kd" in get_registries().methods


def loss(method, s, t):
    return method({"logits": s}, {"logits": t})


def test_loss_values():
    s = torch.randn(6, 10, dtype=torch.float64)
    m = CosineLogits()
    assert loss(m, s, s).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(m, s, -s).item() == pytest.approx(2.0)
    assert loss(m, s, 3.0 * s).item() == pytest.approx(0.0, abs=1e-12)  # scale-invariant
    t = torch.randn(6, 10, dtype=torch.float64)
    expected = (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean()
    torch.testing.assert_close(loss(m, s, t), expected)


def test_center_ignores_per_row_shifts():
    s = torch.randn(5, 8, dtype=torch.float64)
    shifted = 2.0 * s + torch.randn(5, 1, dtype=torch.float64)
    assert loss(CosineLogits(center=True), s, shifted).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(CosineLogits(center=False), s, shifted).item() > 1e-3


def test_gradient_reaches_student_only_and_any_leading_shape():
    s = torch.randn(2, 3, 7, requires_grad=True)
    t = torch.randn(2, 3, 7, requires_grad=True)
    loss(CosineLogits(), s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_half_precision_accumulates_in_float32():
    s = torch.randn(4, 1000).half()
    out = loss(CosineLogits(), s, s)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(0.0, abs=1e-3)


def test_option_validation():
    with pytest.raises(TypeError, match="unknown option 'centre'.*center"):
        CosineLogits(centre=True)
    with pytest.raises(ValueError, match="eps"):
        CosineLogits(eps=0)
    with pytest.raises(TypeError, match="center"):
        CosineLogits(center="yes")
    with pytest.raises(ValueError, match="same shape"):
        loss(CosineLogits(), torch.randn(2, 3), torch.randn(2, 4))
