r"""The two relational losses of RKD as plain functions of batch embeddings.

Both take the student and teacher embeddings of one batch, ``(N, ...)`` each, flattened to
``(N, Ds)`` and ``(N, Dt)``: the widths may differ, because only relations *between samples*
are compared. The teacher side is a constant (detached, computed without a graph). Arithmetic is
in float32 at least (half/bfloat16 inputs give a float32 loss); float64 stays float64.

Paper: W. Park, D. Kim, Y. Lu, M. Cho, "Relational Knowledge Distillation", CVPR 2019,
arXiv:1904.05068. Reductions follow the authors' code (github.com/lenscloth/RKD): the Huber loss
is averaged over all :math:`N^2` pairs and :math:`N^3` triplets, degenerate ones (``i = j``, or
``j`` equal to ``i`` or ``k`` for angles) included: they are 0 on both sides, so they add 0 but
count in the mean, which is what the paper's weights (25, 50) were tuned with. One deliberate
difference: the distance normaliser :math:`\mu` is the mean over the :math:`N(N-1)` off-diagonal
pairs, the paper's definition, where the authors' code averages the *positive* distances only; the
two agree unless a batch holds duplicate embeddings (the off-diagonal mean stays smooth then).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: Squared distances below ``ROUNDOFF * eps(dtype) * (|x_i|² + |x_j|²)`` (centred rows) are rounding
#: noise of the Gram form and count as 0; relative, so every threshold here is scale-free.
ROUNDOFF = 8.0
#: Fewest samples that carry a relation: with 2, the normalised distance is always 1 and the
#: only angle is degenerate, so both losses would be identically 0.
MIN_BATCH = 3


def _pair(student: torch.Tensor, teacher: torch.Tensor, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Check and flatten both sides to ``(N, D)`` in the accumulation dtype; the teacher detached."""
    for side, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
            raise TypeError(f"{fn}: the {side} embeddings must be a floating-point tensor, got {got}")
        if x.dim() < 2:
            raise ValueError(f"{fn}: the {side} embeddings must be a batch (N, D) or (N, ...), "
                             f"got shape {tuple(x.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{fn}: student batch {student.shape[0]} != teacher batch {teacher.shape[0]}")
    if student.shape[0] < MIN_BATCH:
        raise ValueError(f"{fn}: relational distillation needs at least {MIN_BATCH} samples per batch "
                         f"(relations between pairs and triplets), got {student.shape[0]}")
    if student.device != teacher.device:
        raise ValueError(f"{fn}: student on {student.device} but teacher on {teacher.device}")
    acc = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    return student.flatten(1).to(acc), teacher.detach().flatten(1).to(acc)


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    r"""Euclidean distances :math:`\|x_i - x_j\|_2` of the rows of ``x`` (N, D), as an (N, N) matrix.

    Computed from the Gram matrix of the *centred* rows, O(N²) memory: distances do not change
    under a translation, and centring removes the cancellation of the Gram form when all rows share
    a large offset (e.g. post-ReLU features). The diagonal, and any pair whose squared distance is
    at the rounding level of that form (:data:`ROUNDOFF` · machine eps · (|x_i|² + |x_j|²):
    duplicate rows, or rows closer than ~0.1 % (float32) of their norm), is an exact 0 with a zero
    gradient: not NaN, not rounding noise, and not the sqrt(eps) offset of a clamp. The threshold
    is relative, so tiny and huge embeddings are treated alike.
    """
    x = x - x.mean(dim=0, keepdim=True)
    sq = x.pow(2).sum(dim=1)
    norms = sq[:, None] + sq[None, :]
    d2 = norms - 2.0 * (x @ x.T)
    off_diagonal = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    positive = (d2 > ROUNDOFF * torch.finfo(x.dtype).eps * norms) & off_diagonal
    return torch.where(positive, torch.where(positive, d2, torch.ones_like(d2)).sqrt(), torch.zeros_like(d2))


def distance_potential(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\psi_D(x_i, x_j) = \|x_i - x_j\|_2 / \mu`, with :math:`\mu` the mean distance over the
    :math:`N(N-1)` off-diagonal pairs; (N, N). Invariant to translating, rotating and scaling ``x``."""
    d = pairwise_distances(x)
    n = x.shape[0]
    mu = d.sum() / (n * (n - 1))
    return d / mu.clamp_min(torch.finfo(x.dtype).tiny)  # all rows equal: d = 0, so ψ = 0


def angle_potential(x: torch.Tensor) -> torch.Tensor:
    r""":math:`\psi_A(x_i, x_j, x_k) = \langle e^{ij}, e^{kj}\rangle`, the cosine of the angle at
    :math:`x_j`, with :math:`e^{ij} = (x_i - x_j)/\|x_i - x_j\|_2`; returned as ``a[j, i, k]``,
    (N, N, N). Batched as in the paper's code: ``e = normalize(x[None] - x[:, None])``,
    ``a = bmm(e, eᵀ)``; entries with ``i = j`` or ``k = j`` are 0. Memory O(N²·D + N³).

    A zero difference (``i = j``, or two identical embeddings) gets ``e = 0`` with a zero gradient.
    (``F.normalize(eps=1e-12)`` would give it a gradient of 1/eps = 1e12 whenever the other side's
    cosine is not 0, i.e. whenever a batch holds duplicate student embeddings, e.g. from a
    collapsed student.)
    """
    diff = x[None, :, :] - x[:, None, :]  # diff[j, i] = x_i - x_j
    norm = torch.linalg.vector_norm(diff, dim=2, keepdim=True)
    nonzero = norm > 0
    e = torch.where(nonzero, diff / torch.where(nonzero, norm, torch.ones_like(norm)), torch.zeros_like(diff))
    return torch.bmm(e, e.transpose(1, 2))


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    r"""RKD distance loss (RKD-D):

    .. math:: \mathcal{L}_D = \frac{1}{N^2} \sum_{i,j}
              \ell_\delta\big(\psi_D(s_i, s_j) - \psi_D(t_i, t_j)\big),\qquad
              \psi_D(x_i, x_j) = \frac{\|x_i - x_j\|_2}{\mu_x},\
              \mu_x = \frac{1}{N(N-1)}\sum_{i\ne j}\|x_i - x_j\|_2

    with :math:`\ell_\delta` the Huber loss, δ = 1 (``smooth_l1_loss``). Invariant to scaling,
    translating and rotating either side. ``student`` (N, ...), ``teacher`` (N, ...), N >= 3.
    """
    s, t = _pair(student, teacher, "rkd_distance_loss")
    with torch.no_grad():
        target = distance_potential(t)
    return F.smooth_l1_loss(distance_potential(s), target, beta=1.0)


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    r"""RKD angle loss (RKD-A):

    .. math:: \mathcal{L}_A = \frac{1}{N^3} \sum_{i,j,k}
              \ell_\delta\big(\psi_A(s_i, s_j, s_k) - \psi_A(t_i, t_j, t_k)\big),\qquad
              \psi_A(x_i, x_j, x_k) = \Big\langle \frac{x_i - x_j}{\|x_i - x_j\|_2},
              \frac{x_k - x_j}{\|x_k - x_j\|_2} \Big\rangle

    with :math:`\ell_\delta` the Huber loss, δ = 1. Invariant to scaling, translating and rotating
    either side. ``student`` (N, ...), ``teacher`` (N, ...), N >= 3.
    """
    s, t = _pair(student, teacher, "rkd_angle_loss")
    with torch.no_grad():
        target = angle_potential(t)
    return F.smooth_l1_loss(angle_potential(s), target, beta=1.0)


def rkd_loss(student: torch.Tensor, teacher: torch.Tensor, distance_weight: float = 25.0,
             angle_weight: float = 50.0) -> torch.Tensor:
    r""":math:`\lambda_D \mathcal{L}_D + \lambda_A \mathcal{L}_A` (paper: :math:`\lambda_D = 25`,
    :math:`\lambda_A = 50`); a term whose weight is 0 is not computed."""
    total = None
    for weight, fn in ((distance_weight, rkd_distance_loss), (angle_weight, rkd_angle_loss)):
        if weight:
            term = weight * fn(student, teacher)
            total = term if total is None else total + term
    if total is None:
        raise ValueError("rkd_loss: distance_weight and angle_weight are both 0; there is nothing to compute")
    return total


__all__ = ["rkd_loss", "rkd_distance_loss", "rkd_angle_loss", "distance_potential", "angle_potential",
           "pairwise_distances", "MIN_BATCH", "ROUNDOFF"]
