"""Hinton logit distillation (``kd``)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .. import functional
from .base import Method

DIVERGENCES = ("kl", "reverse_kl", "jsd")


class KD(Method):
    r"""Logit distillation: the student matches the teacher's temperature-softened output distribution.

    With ``p = softmax(t / T)`` (teacher) and ``q = softmax(s / T)`` (student), per row:

    - ``divergence="kl"`` (Hinton's loss): :math:`T^2 \cdot KL(p \| q)`;
    - ``divergence="reverse_kl"`` (mode-seeking): :math:`T^2 \cdot KL(q \| p)`;
    - ``divergence="jsd"``: :math:`T^2 \cdot (\beta KL(p \| m) + (1-\beta) KL(q \| m))`,
      :math:`m = \beta p + (1-\beta) q`,

    averaged over rows (``batchmean``); logits of any shape ``(..., C)`` are flattened to rows.
    Token logits ``(B, L, C)`` of a batch with an ``attention_mask`` leave the padding positions out.
    The :math:`T^2` factor keeps gradient magnitudes comparable across temperatures. The teacher is
    a constant. Computed by :func:`distillx.functional.kd_loss` (fused kernel when built).

    Paper: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network",
    NIPS 2014 Deep Learning Workshop, 2015, arXiv:1503.02531.

    Options:
        T: temperature, > 0 (default 4.0).
        divergence: ``"kl"``, ``"reverse_kl"`` or ``"jsd"`` (default ``"kl"``).
        beta: JSD mixing weight β, strictly between 0 and 1 (default 0.5; ignored otherwise).
        weight: multiplier of this loss in the total, >= 0 (default 1.0).

    Example (the Hinton setup: 0.9 soft targets, 0.1 task loss set on the Distiller)::

        import distillx as dx
        kd = dx.method("kd", T=4.0, divergence="kl", weight=0.9)

        # the same entry in a run config
        {"name": "kd", "T": 4.0, "divergence": "kl", "weight": 0.9}
    """

    name = "kd"
    options = {"T": 4.0, "divergence": "kl", "beta": 0.5}

    def validate(self) -> None:
        self.check_number("T", gt=0)
        self.check_choice("divergence", DIVERGENCES)
        # beta = 0 or 1 makes the mixture equal one side, so the JSD is identically 0.
        self.check_number("beta", gt=0, lt=1)

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None) -> torch.Tensor:
        s = self.require(student, "logits", "student")
        mask = self.attention_mask(batch)
        if mask is not None and not (isinstance(s, torch.Tensor) and s.dim() == 3
                                     and tuple(s.shape[:2]) == tuple(mask.shape)):
            mask = None  # only token logits (B, L, C) are masked
        return functional.kd_loss(
            s,
            self.require(teacher, "logits", "teacher"),
            temperature=self.T,
            divergence=self.divergence,
            beta=self.beta,
            reduction="batchmean",
            mask=mask,
        )
