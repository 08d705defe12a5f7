"""Attention transfer (``at``) for convolutional feature maps."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .. import functional
from .kfd import _PairsMethod


class AT(_PairsMethod):
    r"""Attention transfer: the student's spatial attention maps match the teacher's.

    For a feature map :math:`F \in \mathbb{R}^{B \times C \times H \times W}` the attention map is
    :math:`a(F) = \operatorname{vec}(\operatorname{mean}_c |F_c|^p) / \|\cdot\|_2` per sample, and

    .. math:: \mathcal{L} = \sum_j \operatorname{mean}_{b,k}\big(a(F^s_j)_{b,k} - a(F^t_j)_{b,k}\big)^2

    over the layer pairs :math:`j` (usually the outputs of every stage). Channel counts may differ;
    when the spatial sizes differ, the larger attention map is average-pooled to the smaller size.
    Computed by :func:`distillx.functional.attention_map_loss`. Features that are not maps
    (e.g. a ``(B, D)`` vector) are an error naming the layer.

    Paper: S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention: Improving the
    Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017,
    arXiv:1612.03928 (β = 1000 per pair, i.e. ``weight=1000`` with this mean-normalised loss).

    Options:
        student, teacher: layer paths of feature maps, or lists paired by position; required.
        p: exponent of the channel reduction, > 0 (default 2).
        weight: multiplier of this loss in the total (default 1.0).

    Example::

        at = dx.method("at", student=["layer1", "layer2", "layer3"], teacher=["layer1", "layer2", "layer3"],
                       p=2, weight=1000.0)

        # in a run config
        {"name": "at", "student": ["layer2", "layer3"], "teacher": ["layer2", "layer3"], "weight": 1000.0}
    """

    name = "at"
    options = {"student": None, "teacher": None, "p": 2.0}

    def validate(self) -> None:
        super().validate()
        self.check_number("p", gt=0)

    def pair_loss(self, key: str, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None
                  ) -> torch.Tensor:
        what = "feature maps (B, C, H, W)"
        s = self.require_feature(student, key, "student", ndim=(4,), what=what)
        t = self.require_feature(teacher, key, "teacher", ndim=(4,), what=what)
        if s.shape[0] != t.shape[0]:
            raise self.feature_error(key, f"student batch {s.shape[0]} != teacher batch {t.shape[0]}")
        return functional.attention_map_loss(s, t, p=float(self.p))


__all__ = ["AT"]
