"""Gamma and Beta variates drawn from an explicit :class:`torch.Generator`.

``torch.distributions.Beta``/``Gamma`` (``torch._standard_gamma``) always use the global RNG, so
they cannot be replayed from a checkpointed generator. These samplers use only
``torch.rand``/``torch.randn`` with ``generator=``, so the same generator state gives the same draws.

* Gamma(k, 1), k >= 1: Marsaglia & Tsang, "A simple method for generating gamma variables",
  ACM TOMS 26(3), 2000. With d = k - 1/3, c = 1/sqrt(9d), draw x ~ N(0, 1), u ~ U(0, 1],
  v = (1 + c x)^3; accept d v when v > 0 and log u < x^2/2 + d - d v + d log v (acceptance rate
  above 95 % for every k >= 1). Rejected draws are redrawn, vectorised over the pending ones.
* Gamma(k, 1), 0 < k < 1: the same paper's boost, Gamma(k) = Gamma(k + 1) * U^(1/k), computed in
  log space (log Gamma(k+1) + log(U)/k) so that tiny shapes (alpha = 0.2 in mixup) do not
  underflow.
* Beta(a, b) = X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b), computed as sigmoid(log X - log Y).

Everything is float64 on the generator's device.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from .. import _checks

Size = Union[int, Sequence[int]]


def _numel(size: Size) -> tuple[tuple[int, ...], int]:
    shape = (size,) if isinstance(size, int) else tuple(size)
    return shape, math.prod(shape)


def _check_shape_param(value: float, what: str) -> float:
    return _checks.positive(what, value)


def sample_log_gamma(k: float, size: Size, generator: torch.Generator) -> torch.Tensor:
    """``log`` of Gamma(``k``, 1) variates, float64 tensor of shape ``size`` on the generator's device."""
    k = _check_shape_param(k, "gamma shape k")
    shape, n = _numel(size)
    device = generator.device
    boost = k < 1
    d = (k + 1 if boost else k) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64, device=device)
    pending = torch.arange(n, device=device)
    while pending.numel():
        m = pending.numel()
        x = torch.randn(m, generator=generator, device=device, dtype=torch.float64)
        u = 1.0 - torch.rand(m, generator=generator, device=device, dtype=torch.float64)  # (0, 1]
        v = (1.0 + c * x) ** 3
        log_v = torch.log(v.clamp_min(torch.finfo(torch.float64).tiny))
        accept = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * log_v)
        out[pending[accept]] = math.log(d) + log_v[accept]
        pending = pending[~accept]
    if boost:
        u = 1.0 - torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        out = out + torch.log(u) / k
    return out.reshape(shape)


def sample_gamma(k: float, size: Size, generator: torch.Generator) -> torch.Tensor:
    """Gamma(``k``, 1) variates (float64, on the generator's device); see the module docstring."""
    return sample_log_gamma(k, size, generator).exp()


def sample_beta(a: float, b: float, size: Size, generator: torch.Generator) -> torch.Tensor:
    """Beta(``a``, ``b``) variates in [0, 1] (float64, on the generator's device): X / (X + Y)."""
    log_x = sample_log_gamma(_check_shape_param(a, "beta parameter a"), size, generator)
    log_y = sample_log_gamma(_check_shape_param(b, "beta parameter b"), size, generator)
    return torch.sigmoid(log_x - log_y)


__all__ = ["sample_beta", "sample_gamma", "sample_log_gamma"]
