"""The ``rkd`` distillation method: Relational Knowledge Distillation on batch embeddings."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from distillx.methods import FeatureRequest, Method
from distillx.methods.base import PENULTIMATE, layer_pairs

from .losses import MIN_BATCH, rkd_loss

#: Values of the ``feature`` option: what RKD relates when no layer path is given.
FEATURES = (PENULTIMATE, "logits")


class RKD(Method):
    r"""Relational Knowledge Distillation: the student reproduces the *relations* between the
    teacher's embeddings of a batch (distances of pairs, angles of triplets), not the embeddings.

    With :math:`s_i`, :math:`t_i` the flattened student and teacher embeddings of sample :math:`i`
    (widths may differ: no adapter is needed or built) and :math:`\ell_\delta` the Huber loss
    (smooth L1, δ = 1):

    .. math::
        \psi_D(x_i, x_j) = \frac{\|x_i - x_j\|_2}{\mu_x},\quad
        \mu_x = \frac{1}{N(N-1)} \sum_{i \ne j} \|x_i - x_j\|_2,\qquad
        \mathcal{L}_D = \frac{1}{N^2} \sum_{i,j} \ell_\delta\big(\psi_D(s_i,s_j) - \psi_D(t_i,t_j)\big)

        \psi_A(x_i, x_j, x_k) = \Big\langle \tfrac{x_i - x_j}{\|x_i - x_j\|},
        \tfrac{x_k - x_j}{\|x_k - x_j\|} \Big\rangle,\qquad
        \mathcal{L}_A = \frac{1}{N^3} \sum_{i,j,k} \ell_\delta\big(\psi_A(s_i,s_j,s_k) - \psi_A(t_i,t_j,t_k)\big)

        \mathcal{L} = \sum_{\text{layer pairs}} \lambda_D \mathcal{L}_D + \lambda_A \mathcal{L}_A

    Both potentials are invariant to translating, rotating and uniformly scaling an embedding, so
    the loss is 0 whenever the student's embedding is the teacher's up to such a similarity. The
    teacher side is a constant. Cost per batch: O(N²·D) for distances, O(N²·D + N³) memory for
    angles (N = 128: 2M cosines per side). Computed by :func:`distillx_rkd.rkd_distance_loss` and
    :func:`distillx_rkd.rkd_angle_loss` (float32 arithmetic at least).

    Batches: relations need at least 3 samples (with 2 the normalised distance is always 1 and the
    only angle is degenerate, so the loss would be a silent 0). A smaller batch raises
    :class:`~distillx.methods.FeatureShapeError` naming the method, the layers and the batch size;
    use ``drop_last=True`` when the last batch of an epoch could be that small. A feature holding
    NaN/inf raises the same error, naming the side.

    Paper: W. Park, D. Kim, Y. Lu, M. Cho, "Relational Knowledge Distillation", CVPR 2019,
    arXiv:1904.05068 (λ_D = 25, λ_A = 50 on the final embedding for metric learning and
    classification).

    Options:
        distance_weight: λ_D, >= 0 (default 25.0; 0 skips the distance term).
        angle_weight: λ_A, >= 0 (default 50.0; 0 skips the angle term and its O(N³) cost).
        feature: what to relate when ``student``/``teacher`` are not given: ``"penultimate"``
            (default: the input of each model's output layer) or ``"logits"`` (the models' outputs).
        student, teacher: layer paths overriding ``feature`` (``"PATH[@input][:SELECT]"`` shorthand,
            e.g. ``"backbone.pool"``), or lists of paths paired by position (losses summed); a side
            left None uses the penultimate feature. Not allowed with ``feature="logits"``.
        weight: multiplier of this loss in the total, >= 0 (default 1.0).

    Example::

        import distillx as dx
        rkd = dx.method("rkd")                                    # paper weights, penultimate embeddings
        rkd = dx.method("rkd", distance_weight=25.0, angle_weight=0.0, feature="logits")   # RKD-D on logits
        rkd = dx.method("rkd", student="layer4", teacher="layer4", weight=1.0)

        # in a run config
        {"name": "rkd", "distance_weight": 25.0, "angle_weight": 50.0, "feature": "penultimate"}
    """

    name = "rkd"
    options = {"distance_weight": 25.0, "angle_weight": 50.0, "feature": PENULTIMATE,
               "student": None, "teacher": None}

    def validate(self) -> None:
        self.check_number("distance_weight", ge=0)
        self.check_number("angle_weight", ge=0)
        if self.distance_weight == 0 and self.angle_weight == 0:
            raise ValueError(f"method {self.name!r}: distance_weight and angle_weight are both 0, so there is "
                             "nothing to compute; set one of them > 0 (or weight=0 to switch the method off)")
        self.check_choice("feature", FEATURES)
        if self.feature == "logits":
            if self.student is not None or self.teacher is not None:
                raise ValueError(f"method {self.name!r}: feature='logits' relates the models' outputs, so it takes no "
                                 f"student/teacher layer paths (got student={self.student!r}, "
                                 f"teacher={self.teacher!r}); drop them, or leave feature at its default")
            self._pairs = []
        else:
            self._pairs = layer_pairs(self.name, PENULTIMATE if self.student is None else self.student,
                                      PENULTIMATE if self.teacher is None else self.teacher)

    def features(self) -> list[FeatureRequest]:
        return [FeatureRequest(f"pair{i}", s, t) for i, (s, t) in enumerate(self._pairs)]

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None) -> torch.Tensor:
        keys = [f"pair{i}" for i in range(len(self._pairs))] or ["logits"]
        total = None
        for key in keys:
            term = self.pair_loss(key, student, teacher)
            total = term if total is None else total + term
        return total

    def pair_loss(self, key: str, student: Mapping[str, Any], teacher: Mapping[str, Any]) -> torch.Tensor:
        """λ_D·L_D + λ_A·L_A of one feature (``"pair<i>"`` or ``"logits"``), after the input checks."""
        what = "a batch of per-sample embeddings (N, ...) with at least 2 dims"
        s = self.require_feature(student, key, "student", ndim=range(2, 9), what=what)
        t = self.require_feature(teacher, key, "teacher", ndim=range(2, 9), what=what)
        if s.shape[0] != t.shape[0]:
            raise self.feature_error(key, f"student batch {s.shape[0]} != teacher batch {t.shape[0]}")
        if s.shape[0] < MIN_BATCH:
            raise self.feature_error(
                key, f"relational distillation needs at least {MIN_BATCH} samples per batch, got a batch of "
                     f"{s.shape[0]} (with 2 the normalised distance is always 1 and no angle exists, with 1 there "
                     "is no relation at all); use larger batches, and DataLoader(..., drop_last=True) when the "
                     "last batch of an epoch can be this small")
        self._check_finite(key, s, t)
        return rkd_loss(s, t, self.distance_weight, self.angle_weight)

    def _check_finite(self, key: str, s: torch.Tensor, t: torch.Tensor) -> None:
        """NaN/inf in a feature would make every relation NaN; say which side (one synchronisation)."""
        ok = torch.stack([torch.isfinite(s.detach()).all(), torch.isfinite(t.detach()).all()])
        if bool(ok.all()):
            return
        side = "student" if not bool(ok[0]) else "teacher"
        raise self.feature_error(key, f"the {side} feature holds NaN/inf values, so no relation can be computed "
                                      f"(the {side} model diverged, or its input holds NaN)", side)
