"""An independent, deliberately naive implementation of the RKD formulas (Park et al., CVPR 2019),
written from the paper with Python loops over pairs and triplets: the oracle of the loss tests.

It shares no code with distillx_rkd (no Gram-matrix distances, no batched normalize/bmm): distances
are norms of explicit differences, cosines are explicit dot products of unit vectors, and the Huber
loss is written out. Reductions as in the authors' code: mean over all N² pairs / N³ triplets, the
degenerate ones counting as 0; μ the mean distance over the N(N-1) off-diagonal pairs.
"""
from __future__ import annotations

import itertools

import torch


def huber(x: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    a = x.abs()
    return torch.where(a < delta, 0.5 * x * x / delta, a - 0.5 * delta)


def distance_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s, t = s.flatten(1), t.flatten(1)
    n = s.shape[0]
    off = [(i, j) for i, j in itertools.product(range(n), repeat=2) if i != j]
    mu_s = sum(torch.linalg.vector_norm(s[i] - s[j]) for i, j in off) / len(off)
    mu_t = sum(torch.linalg.vector_norm(t[i] - t[j]) for i, j in off) / len(off)
    total = s.new_zeros(())
    for i, j in off:  # diagonal pairs: 0 on both sides, huber(0) = 0
        total = total + huber(torch.linalg.vector_norm(s[i] - s[j]) / mu_s
                              - torch.linalg.vector_norm(t[i] - t[j]) / mu_t)
    return total / n ** 2


def cosine_at(x: torch.Tensor, i: int, j: int, k: int) -> torch.Tensor:
    """cos of the angle at x_j in the triangle (x_i, x_j, x_k); 0 when degenerate (a side of length 0:
    i == j, k == j, or duplicate embeddings)."""
    u, v = x[i] - x[j], x[k] - x[j]
    nu, nv = torch.linalg.vector_norm(u), torch.linalg.vector_norm(v)
    if i == j or k == j or nu == 0 or nv == 0:
        return x.new_zeros(())
    return (u / nu) @ (v / nv)


def angle_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s, t = s.flatten(1), t.flatten(1)
    n = s.shape[0]
    total = s.new_zeros(())
    for i, j, k in itertools.product(range(n), repeat=3):
        total = total + huber(cosine_at(s, i, j, k) - cosine_at(t, i, j, k))
    return total / n ** 3


def max_distance_gap(s: torch.Tensor, t: torch.Tensor) -> float:
    """Largest |ψ_D(s) − ψ_D(t)|: lets a test check it reached Huber's linear branch (> 1)."""
    s, t = s.flatten(1), t.flatten(1)
    ds, dt = torch.cdist(s, s), torch.cdist(t, t)
    n = s.shape[0]
    return float((ds / (ds.sum() / (n * (n - 1))) - dt / (dt.sum() / (n * (n - 1)))).abs().max())
