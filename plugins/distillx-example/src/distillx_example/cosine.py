"""The ``cosine_logits`` method: align the direction of the student's logits with the teacher's."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from distillx.methods import Method


class CosineLogits(Method):
    r"""Cosine distance between student and teacher logits, averaged over rows.

    Per row (logits of shape ``(..., C)`` are flattened to rows):

    .. math:: \ell = 1 - \frac{\langle s, t\rangle}{\max(\|s\|\,\|t\|, \epsilon)}

    in [0, 2]; it ignores the logits' scale, so no temperature is needed. With ``center=True`` each
    row is first shifted to zero mean, which makes it 1 − Pearson correlation, the inter-class
    relation loss of DIST (T. Huang, S. You, F. Wang, C. Qian, C. Xu, "Knowledge Distillation from
    A Stronger Teacher", NeurIPS 2022), applied here to raw logits rather than softmax outputs.
    Softmax is shift-invariant, so centring removes a direction that carries no prediction.

    Options:
        center: subtract each row's mean first (default False).
        eps: lower bound of the norm product, > 0 (default 1e-8).
        weight: multiplier of this loss in the total, >= 0 (default 1.0).

    Example::

        import distillx as dx
        dx.method("cosine_logits", center=True, weight=0.5)
    """

    name = "cosine_logits"
    options = {"center": False, "eps": 1e-8}

    def validate(self) -> None:
        if not isinstance(self.center, bool):
            raise TypeError(f"method {self.name!r}: option center must be a bool, got {self.center!r}")
        self.check_number("eps", gt=0)

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None) -> torch.Tensor:
        s = self.require(student, "logits", "student")
        t = self.require(teacher, "logits", "teacher").detach()
        if s.shape != t.shape:
            raise ValueError(f"cosine_logits: student logits {tuple(s.shape)} and teacher logits "
                             f"{tuple(t.shape)} must have the same shape")
        # Accumulate in float32 at least: half-precision dot products over many classes lose the cosine.
        acc = torch.promote_types(s.dtype, torch.float32)
        s, t = s.reshape(-1, s.shape[-1]).to(acc), t.reshape(-1, t.shape[-1]).to(acc)
        if self.center:
            s = s - s.mean(dim=-1, keepdim=True)
            t = t - t.mean(dim=-1, keepdim=True)
        cos = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1)).clamp_min(self.eps)
        return (1.0 - cos).mean()
