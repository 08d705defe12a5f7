"""Batch-mixing augmentations: ``mixup`` and ``cutmix``. Both mix the targets too.

Each sample is combined with the sample a random permutation pi of the batch pairs it with, and
its target becomes the matching soft distribution over classes, ``lam * onehot(y) + (1 - lam) *
onehot(y[pi])`` (``mixes_targets = True``). Targets may be

* class indices, an integer (N,) tensor: needs the option ``num_classes``;
* already soft, a floating-point (N, C) tensor of class probabilities (e.g. from an earlier mixing
  augmentation): mixed directly.

The result is a floating-point (N, C) tensor whose rows sum to 1 (when the given rows do). The
Distiller's default task loss, ``torch.nn.functional.cross_entropy``, accepts such (N, C)
class-probability targets, so mixed targets work with it unchanged; a custom task loss must accept
them too. Accuracy against mixed targets should compare with ``targets.argmax(1)``.

lam is drawn from Beta(alpha, alpha) once per batch with the generator-driven sampler of
:mod:`distillx.augment.sampling` (``torch.distributions`` would use the global RNG).
"""
from __future__ import annotations

import math

import torch

from .base import Augmentation
from .sampling import sample_beta


class _Mixing(Augmentation):
    """Shared options and target handling of :class:`Mixup` and :class:`CutMix`."""

    options = {"alpha": 1.0, "num_classes": None}
    mixes_targets = True

    def validate(self) -> None:
        self.check_number("alpha", gt=0)
        self.check_int("num_classes", ge=1, optional=True)

    def soft_targets(self, targets, n: int, inputs: torch.Tensor) -> torch.Tensor:
        """``targets`` as an (N, C) floating-point tensor of class probabilities (validated)."""
        expected = ("class indices, an integer (N,) tensor (with option num_classes), or class probabilities, "
                    f"a floating-point (N, C) tensor, with N = {n} as in the inputs")
        if not isinstance(targets, torch.Tensor):
            raise self.batch_error(f"targets must be {expected}; got {type(targets).__name__}")
        dtype = targets.dtype
        if dtype.is_floating_point and targets.dim() == 2 and targets.shape[0] == n:
            if self.num_classes is not None and targets.shape[1] != self.num_classes:
                raise self.batch_error(f"soft targets have {targets.shape[1]} classes but option "
                                       f"num_classes={self.num_classes}")
            return targets
        integer = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
        if not (integer and targets.dim() == 1 and targets.shape[0] == n):
            raise self.batch_error(f"targets must be {expected}; got a {dtype} tensor of shape "
                                   f"{tuple(targets.shape)}")
        if self.num_classes is None:
            raise self.batch_error("integer class-index targets need the option num_classes (the number of "
                                   "classes) to become soft (N, C) targets")
        if targets.numel():
            lo, hi = (int(v) for v in torch.aminmax(targets))
            if lo < 0 or hi >= self.num_classes:
                raise self.batch_error(f"targets must be class indices in [0, num_classes={self.num_classes}), "
                                       f"got values in [{lo}, {hi}]")
        out_dtype = torch.promote_types(inputs.dtype, torch.float32) if inputs.is_floating_point() else torch.float32
        return torch.nn.functional.one_hot(targets.long(), self.num_classes).to(out_dtype)

    @staticmethod
    def mix(soft: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
        """``lam * soft + (1 - lam) * soft[perm]``."""
        return lam * soft + (1.0 - lam) * soft[perm]


class Mixup(_Mixing):
    """mixup (Zhang, Cisse, Dauphin & Lopez-Paz, "mixup: Beyond Empirical Risk Minimization", ICLR 2018).

    lam ~ Beta(alpha, alpha) once per batch, pi a random permutation of the batch::

        x' = lam * x + (1 - lam) * x[pi]
        y' = lam * onehot(y) + (1 - lam) * onehot(y[pi])

    Inputs: floating-point (N, ...). Targets: see :mod:`distillx.augment.mixing` (soft (N, C) out).
    Random draws, in order: lam, then pi.
    """

    name = "mixup"
    options = {"alpha": 0.2}

    def apply(self, inputs, targets, generator):
        x = self.require_tensor(inputs, "inputs", "(N, ...) floating-point", floating=True, min_ndim=1)
        soft = self.soft_targets(targets, x.shape[0], x)
        lam = float(sample_beta(self.alpha, self.alpha, (), generator))
        perm = self.randperm(x.shape[0], generator, x.device)
        return lam * x + (1.0 - lam) * x[perm], self.mix(soft, perm.to(soft.device), lam)


class CutMix(_Mixing):
    """CutMix (Yun, Han, Oh, Chun, Choe & Yoo, "CutMix: Regularization Strategy to Train Strong
    Classifiers with Localizable Features", ICCV 2019).

    lam ~ Beta(alpha, alpha) once per batch. A box of about (1 - lam) of the image area, with sides
    ``int(H sqrt(1 - lam))`` x ``int(W sqrt(1 - lam))`` around a uniformly drawn centre (clipped to
    the image, as in the paper's code), is pasted into every image from its partner x[pi]. lam is
    then recomputed from the box actually pasted, ``lam = 1 - box_area / (H W)``, and

        y' = lam * onehot(y) + (1 - lam) * onehot(y[pi])

    so each target weight is exactly the fraction of pixels that came from that image. One box per
    batch. Inputs: (N, C, H, W) of any real dtype. Random draws, in order: lam, centre row, centre
    column, pi.
    """

    name = "cutmix"
    options = {"alpha": 1.0}

    def apply(self, inputs, targets, generator):
        x = self.require_tensor(inputs, "inputs", "(N, C, H, W) images", ndim=4)
        n, _, h, w = x.shape
        if h == 0 or w == 0:
            raise self.batch_error(f"inputs must be (N, C, H, W) images with H, W >= 1, got shape {tuple(x.shape)}")
        soft = self.soft_targets(targets, n, x)
        lam = float(sample_beta(self.alpha, self.alpha, (), generator))
        cy = int(self.randint(h, (1,), generator))
        cx = int(self.randint(w, (1,), generator))
        perm = self.randperm(n, generator, x.device)
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(h * ratio), int(w * ratio)
        y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        out = x.clone()
        if y2 > y1 and x2 > x1:
            out[:, :, y1:y2, x1:x2] = x[:, :, y1:y2, x1:x2][perm]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
        return out, self.mix(soft, perm.to(soft.device), lam)


__all__ = ["Mixup", "CutMix"]
