"""The generator-driven Gamma and Beta samplers."""
from __future__ import annotations

import pytest
import torch

from distillx.augment.sampling import sample_beta, sample_gamma


@pytest.mark.parametrize("a, b", [(0.2, 0.2), (1.0, 1.0), (2.0, 5.0), (0.5, 3.0)])
def test_beta_mean_and_variance_match_theory(a, b):
    draws = sample_beta(a, b, 20_000, torch.Generator().manual_seed(0))
    assert draws.dtype == torch.float64 and draws.shape == (20_000,)
    assert bool(((draws >= 0) & (draws <= 1)).all()) and not bool(draws.isnan().any())
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert draws.mean().item() == pytest.approx(mean, abs=5 * (var / 20_000) ** 0.5)
    assert draws.var().item() == pytest.approx(var, rel=0.05)


@pytest.mark.parametrize("k", [0.2, 1.0, 3.0])
def test_gamma_mean_and_variance_match_theory(k):
    draws = sample_gamma(k, (100, 200), torch.Generator().manual_seed(1))
    assert draws.shape == (100, 200) and bool((draws >= 0).all())
    assert draws.mean().item() == pytest.approx(k, rel=0.03)
    assert draws.var().item() == pytest.approx(k, rel=0.08)


def test_sampler_is_driven_by_the_generator_only():
    torch.manual_seed(123)
    first = sample_beta(0.2, 0.2, 1000, torch.Generator().manual_seed(5))
    torch.manual_seed(456)
    second = sample_beta(0.2, 0.2, 1000, torch.Generator().manual_seed(5))
    assert torch.equal(first, second)
    assert not torch.equal(first, sample_beta(0.2, 0.2, 1000, torch.Generator().manual_seed(6)))
    torch.manual_seed(456)
    state = torch.get_rng_state()
    sample_beta(2.0, 2.0, 10, torch.Generator())
    assert torch.equal(torch.get_rng_state(), state)


def test_tiny_shape_does_not_underflow_to_nan():
    draws = sample_beta(0.01, 0.01, 5000, torch.Generator().manual_seed(2))
    assert not bool(draws.isnan().any())
    assert draws.mean().item() == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_bad_parameters(bad):
    with pytest.raises(ValueError, match="beta parameter a must be a finite number > 0"):
        sample_beta(bad, 1.0, 3, torch.Generator())
