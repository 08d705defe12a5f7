"""Expected values for the weight-transfer tests, computed independently of distillx.transfer."""
from __future__ import annotations

from fractions import Fraction

import torch


def uniform(d_teacher: int, d_student: int) -> list[int]:
    """round(linspace(0, D_t - 1, D_s)) in exact rational arithmetic (Python's round: ties to even)."""
    if d_student == 1:
        return [0]
    return [round(Fraction(k * (d_teacher - 1), d_student - 1)) for k in range(d_student)]


def select(t: torch.Tensor, shape, blocks0: int = 1) -> torch.Tensor:
    """Uniform selection of ``t`` down to ``shape``; dim 0 selected inside ``blocks0`` equal blocks."""
    for dim, d in enumerate(shape):
        D = t.shape[dim]
        if dim == 0 and blocks0 > 1:
            bt, bs = D // blocks0, d // blocks0
            idx = [b * bt + i for b in range(blocks0) for i in uniform(bt, bs)]
        else:
            idx = uniform(D, d)
        t = t.index_select(dim, torch.tensor(idx))
    return t


def truncate(t: torch.Tensor, shape) -> torch.Tensor:
    return t[tuple(slice(0, d) for d in shape)]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"
