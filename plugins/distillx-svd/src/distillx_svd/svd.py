r"""The ``svd`` weight transfer: keep the teacher's top singular values in the student's shape.

For a teacher matrix :math:`W_t \in \mathbb R^{M\times N}` and a student shape :math:`(m, n)`:

.. math::

   W_t = U \Sigma V^\top,\qquad k = \min(m, n, M, N),

   A = P_{out} U_k \in \mathbb R^{m\times k},\qquad B = P_{in} V_k \in \mathbb R^{n\times k},

   W_s = \operatorname{polar}(A)\;\Sigma_k\;\operatorname{polar}(B)^\top

where :math:`U_k, \Sigma_k, V_k` are the top-:math:`k` singular triplets, :math:`P_{out}`,
:math:`P_{in}` are the coordinate selections of distillx's Weight Selection
(:math:`I(D, d) = \operatorname{round}(\operatorname{linspace}(0, D-1, d))`, the same indices for
every tensor of a width, so adjacent layers agree on which teacher coordinates a student
coordinate stands for), and :math:`\operatorname{polar}(X) = U_X V_X^\top` (from the thin SVD
:math:`X = U_X S_X V_X^\top`) is the matrix with orthonormal columns closest to :math:`X` in
Frobenius norm (orthogonal Procrustes).

In words: the student's singular *values* are exactly the teacher's :math:`k` largest (the
teacher's strongest directions keep their gain), and its singular *vectors* are the teacher's,
restricted to the coordinates the student keeps and re-orthonormalised. Properties:

- equal shapes give back :math:`W_t` (up to rounding; the strategy then simply copies);
- when :math:`W_t` lives on the selected rows and columns (zero elsewhere), :math:`W_s` equals
  the plain selection :math:`P_{out} W_t P_{in}^\top`: it generalises Weight Selection;
- it is defined for any shapes, a wider student included (:math:`I(D, d)` repeats indices when
  :math:`d > D`), and it does not depend on the sign or basis ambiguity of the SVD: flipping
  :math:`(u_i, v_i)` or rotating a degenerate singular subspace changes :math:`\operatorname{polar}(A)`
  and :math:`\operatorname{polar}(B)` by the same orthogonal factor, which cancels around
  :math:`\Sigma_k`. (If :math:`A` or :math:`B` loses rank, the re-orthonormalised frame is
  arbitrary in the lost directions, but still computed deterministically.)

Tensors with more than two dimensions (convolutions, :math:`(C_{out}, C_{in}, k_1, \dots)`) are
matrices :math:`(C_{out}, C_{in} \cdot K)` whose kernel :math:`K` must be equal; :math:`P_{in}`
selects input channels and keeps each one's whole kernel. Fused blocks (the q/k/v rows of
``nn.MultiheadAttention.in_proj_weight``) are projected block by block; the rows of an output
layer (classes) and of an embedding (tokens) are kept, not selected. Vectors (biases, norms) have
no spectrum to keep and are selected uniformly, as Weight Selection does.

The low-rank idea follows SVD-based initialisation of compressed layers (e.g. Denton et al.,
"Exploiting Linear Structure Within Convolutional Networks for Efficient Evaluation", NeurIPS
2014, and the truncated-SVD factorisation of fully connected layers of Xue et al., Interspeech
2013), here mapped to a smaller dense shape instead of a factorised one.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from distillx.transfer import (ShapeMismatch, TransferReport, check_models, correspond, layout_of,
                               output_layer, shrink, uniform_indices)
from distillx.transfer.adapt import Layout
from distillx.transfer.apply import settle_trivial
from distillx.transfer.correspond import LayerRule, MappingSpec


def polar(x: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns closest to ``x`` (p, k), p >= k: ``U_x V_x^T``."""
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def project(teacher: torch.Tensor, rows: Sequence[int], cols: Sequence[int]) -> tuple[torch.Tensor, int, float]:
    """:math:`\\operatorname{polar}(P_{out}U_k)\\,\\Sigma_k\\,\\operatorname{polar}(P_{in}V_k)^\\top` for a
    teacher matrix (float64), the selected ``rows`` and ``cols``; also returns ``k`` and the share of
    the teacher's energy :math:`\\sum_{i<k}\\sigma_i^2/\\sum_i\\sigma_i^2` the kept values carry."""
    u, s, vh = torch.linalg.svd(teacher, full_matrices=False)
    k = min(len(rows), len(cols), s.numel())
    rows_t = torch.as_tensor(list(rows), dtype=torch.long, device=teacher.device)
    cols_t = torch.as_tensor(list(cols), dtype=torch.long, device=teacher.device)
    a = u[rows_t, :k]
    b = vh[:k].T[cols_t]
    out = polar(a) @ torch.diag(s[:k]) @ polar(b).T
    total = float((s * s).sum())
    energy = float((s[:k] * s[:k]).sum()) / total if total > 0 else 1.0
    return out, k, energy


def _indices(d_teacher: int, d_student: int, keep: Optional[str], what: str) -> list[int]:
    if keep is not None:
        if d_teacher != d_student:
            raise ShapeMismatch(f"{what} differs (teacher {d_teacher}, student {d_student}) but must match ({keep})")
        return list(range(d_teacher))
    return uniform_indices(d_teacher, d_student)


def svd_matrix(teacher: torch.Tensor, shape: Sequence[int], layout: Layout) -> tuple[torch.Tensor, int, float]:
    """The student tensor of ``shape`` from a teacher tensor with 2+ dimensions (see the module docstring)."""
    shape = tuple(int(d) for d in shape)
    if teacher.dim() != len(shape):
        raise ShapeMismatch(f"teacher tensor has {teacher.dim()} dimensions, student {len(shape)}")
    if tuple(teacher.shape[2:]) != shape[2:]:
        raise ShapeMismatch(f"kernel sizes differ (teacher {tuple(teacher.shape[2:])}, student {shape[2:]})")
    kernel = math.prod(shape[2:])
    w = teacher.detach().to(torch.float64).reshape(teacher.shape[0], -1)
    cols = [c * kernel + j for c in _indices(teacher.shape[1], shape[1], layout.keep.get(1), "dim 1")
            for j in range(kernel)]
    blocks = layout.blocks.get(0, 1)
    if teacher.shape[0] % blocks or shape[0] % blocks:
        raise ShapeMismatch(f"{blocks} fused blocks do not divide the rows (teacher {teacher.shape[0]}, "
                            f"student {shape[0]})")
    bt, bs = teacher.shape[0] // blocks, shape[0] // blocks
    rows = _indices(bt, bs, layout.keep.get(0), "dim 0")
    parts, ks, energies = [], [], []
    for b in range(blocks):  # q, k, v (or gates) each keep their own spectrum
        out, k, energy = project(w[b * bt:(b + 1) * bt], rows, cols)
        parts.append(out)
        ks.append(k)
        energies.append(energy)
    return torch.cat(parts).reshape(shape), min(ks), min(energies)


@torch.no_grad()
def svd_transfer(teacher: nn.Module, student: nn.Module, *, layers: Union[str, LayerRule] = "first",
                 mapping: MappingSpec = None, blocks: Optional[Mapping[str, int]] = None) -> TransferReport:
    r"""Spectrum-preserving projection of each teacher matrix onto the student's shape.

    :math:`W_s = \operatorname{polar}(P_{out}U_k)\,\Sigma_k\,\operatorname{polar}(P_{in}V_k)^\top`,
    :math:`k = \min(m, n, M, N)`: the student keeps the teacher's :math:`k` largest singular values
    exactly, with the teacher's singular vectors restricted to the coordinates Weight Selection
    would keep and re-orthonormalised (full derivation and properties: :mod:`distillx_svd.svd`).

    Which teacher tensor feeds which student tensor is distillx's correspondence (the same as the
    ``select`` strategy): ``layers`` (``"first"``/``"uniform"``/callable) for stacks of layers,
    ``mapping`` to override names, ``blocks`` for fused projections. Matrices and convolutions are
    adapted with ``how="svd"``; equal shapes are copied; vectors are selected uniformly; what does
    not fit is skipped with the reason.

    Example::

        pip install ./plugins/distillx-svd
        dx.transfer("svd", teacher, student, layers="uniform")
    """
    check_models(teacher, student)
    report = TransferReport.for_model("svd", student)
    head = output_layer(student)
    for m in correspond(teacher, student, mapping=mapping, layers=layers):
        if settle_trivial(m, report):
            continue
        shape, t_shape = tuple(m.tensor.shape), tuple(m.teacher_tensor.shape)
        layout = layout_of(student, m.name, output_layer=head, blocks=blocks)
        try:
            if len(shape) >= 2:
                value, k, energy = svd_matrix(m.teacher_tensor, shape, layout)
                how = "svd"
                why = f"{m.reason}; rank {k}, {100 * energy:.1f}% of the teacher's spectral energy kept"
            else:
                value, how = shrink(m.teacher_tensor, shape, "select", layout)
                why = f"{m.reason}; a vector has no spectrum: uniform selection"
        except ShapeMismatch as exc:
            report.skipped(m.name, shape, f"{m.teacher_name} {t_shape} does not fit: {exc}")
            continue
        m.tensor.copy_(value)
        report.adapted(m.name, shape, m.teacher_name, t_shape, how, why)
    return report
