"""Kernel-function distillation: Gram matching (``kfd``), Similarity-Preserving KD (``sp``) and
Neuron Selectivity Transfer (``nst``, kernel MMD)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from .. import functional
from ..ops.kernel_table import PARAMS, check_kernel, check_params
from .base import CAPTURE_OPTIONS, PENULTIMATE, FeatureRequest, Method, layer_pairs

#: Flat kernel options of the kernel methods -> the built-in kernels that take them (the kernel table's).
KERNEL_OPTIONS = PARAMS


class _PairsMethod(Method):
    """A method over layer pairs ``student[j]``/``teacher[j]``, keyed ``pair<j>``; the loss sums them."""

    uses_logits = False

    def validate(self) -> None:
        self._pairs = layer_pairs(self.name, self.student, self.teacher)
        if "reduction" in self._defaults:
            self.check_capture_options()

    def features(self) -> list[FeatureRequest]:
        return [self.layer_request(f"pair{i}", s, t) for i, (s, t) in enumerate(self._pairs)]

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None) -> torch.Tensor:
        total = None
        for i in range(len(self._pairs)):
            term = self.pair_loss(f"pair{i}", student, teacher, batch)
            total = term if total is None else total + term
        return total

    def pair_loss(self, key: str, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None
                  ) -> torch.Tensor:
        raise NotImplementedError

    def token_mask(self, batch: Any, *features: torch.Tensor) -> Optional[torch.Tensor]:
        """The batch's attention mask (B, L) when the features are tokens (B, L, D) of that shape, else None."""
        mask = self.attention_mask(batch)
        if mask is None or any(f.dim() != 3 or tuple(f.shape[:2]) != tuple(mask.shape) for f in features):
            return None
        return mask

    def rows(self, outputs: Mapping[str, Any], key: str, side: str) -> torch.Tensor:
        """A per-sample feature of any shape ``(B, ...)`` with at least 2 dims (flattened by the loss)."""
        return self.require_feature(outputs, key, side, ndim=range(2, 9),
                                    what="a batch of per-sample features (B, ...) with at least 2 dims")


def _zero_padding(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Token features with the padding positions set to 0, so they add nothing to a row's inner products."""
    return x if mask is None else x * mask.unsqueeze(-1).to(x.dtype)


class _KernelMethod(_PairsMethod):
    """Shared handling of the ``kernel`` option and the flat kernel parameters.

    ``kernel`` is a built-in name or a callable ``k(x, z) -> (N, M)``; :func:`distillx.method`
    turns the name of a kernel a plugin registered into that callable (``registry_options``).
    """

    kernel_defaults: dict[str, dict[str, Any]] = {}
    registry_options = {"kernel": "kernels"}

    def validate(self) -> None:
        super().validate()
        try:
            check_kernel(self.kernel)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"method {self.name!r}: option {exc}") from None
        for option, kernels in KERNEL_OPTIONS.items():
            if getattr(self, option) is not None and self.kernel not in kernels:
                raise ValueError(f"method {self.name!r}: option {option} applies to the "
                                 f"{' / '.join(kernels)} kernel, not to kernel={self.kernel!r}")
        if isinstance(self.kernel, str):
            try:
                check_params(self.kernel, self.kernel_params())
            except (TypeError, ValueError) as exc:
                raise ValueError(f"method {self.name!r}: option {exc}") from None

    def kernel_params(self) -> dict[str, Any]:
        """The kernel parameters to pass: the options that are set, over this method's defaults."""
        params = dict(self.kernel_defaults.get(self.kernel, {})) if isinstance(self.kernel, str) else {}
        params.update({o: getattr(self, o) for o in KERNEL_OPTIONS if getattr(self, o) is not None})
        return params


class KFD(_KernelMethod):
    r"""Kernel-function distillation by Gram matching: the batch's kernel matrices must agree,

    .. math:: \mathcal{L} = \sum_j \frac{1}{N^2} \sum_{a,b}
              \big(k(s^j_a, s^j_b) - k(t^j_a, t^j_b)\big)^2

    over the layer pairs :math:`j`, with :math:`s_a`, :math:`t_a` the flattened features of sample
    :math:`a`. Student and teacher widths may differ (no adapter). Kernels (each side evaluated
    with its own width): ``linear`` :math:`\langle x,z\rangle`; ``polynomial``
    :math:`(\langle x,z\rangle/D + c)^d`; ``rbf`` :math:`\exp(-\|x-z\|^2/2\sigma^2)` (σ² the mean
    pairwise squared distance per side unless given); ``chebyshev`` (Ozer et al. 2011); ``cosine``;
    or any kernel a plugin registers through ``distillx_register_kernels``.
    ``normalize_rows=True`` L2-normalises each Gram row first (with ``linear``: :class:`SP`).
    Token features (B, L, D) of a batch with an ``attention_mask`` have their padding positions set
    to 0 before flattening, so padding enters no Gram row. Computed by
    :func:`distillx.functional.kernel_gram_loss`.

    Papers: Gram matching generalises Similarity-Preserving KD (F. Tung, G. Mori, ICCV 2019,
    arXiv:1907.09682) from the linear kernel to any kernel; for kernel similarities in distillation
    see also N. Passalis, A. Tefas, "Learning Deep Representations with Probabilistic Knowledge
    Transfer", ECCV 2018; the Chebyshev kernel is S. Ozer, C. H. Chen, H. A. Cirpan, "A set of new
    Chebyshev kernel functions for support vector machine pattern classification", Pattern
    Recognition 44(7), 2011.

    Options:
        student, teacher: layer paths (or lists paired by position); default ``"penultimate"``.
        kernel: kernel name or callable ``k(x, z) -> (N, M)`` (default ``"rbf"``).
        normalize_rows: L2-normalise Gram rows (default False).
        reduction, reduction_kwargs: a capture-time reduction of both features, e.g.
            ``"masked_mean"`` (sentence embeddings from token features; default none).
        degree, coef0: polynomial kernel (defaults 2 and 1); sigma2: rbf bandwidth (default: the
            mean pairwise squared distance); order, eps, scale: Chebyshev kernel (defaults 3, 1e-3 and
            max|x| over the batch).
        weight: multiplier of this loss in the total (default 1.0).

    Example::

        kfd = dx.method("kfd", student="layer3", teacher="layer3", kernel="rbf", weight=1.0)
        kfd = dx.method("kfd", kernel="polynomial", degree=3)        # penultimate features

        # in a run config
        {"name": "kfd", "student": "layer3", "teacher": "layer3", "kernel": "chebyshev", "order": 4}
    """

    name = "kfd"
    options = {"student": PENULTIMATE, "teacher": PENULTIMATE, "kernel": "rbf", "normalize_rows": False,
               **dict.fromkeys(KERNEL_OPTIONS), **CAPTURE_OPTIONS}

    def validate(self) -> None:
        super().validate()
        self.check_bool("normalize_rows")

    def pair_loss(self, key, student, teacher, batch=None):
        s, t = self.rows(student, key, "student"), self.rows(teacher, key, "teacher")
        if s.shape[0] != t.shape[0]:
            raise self.feature_error(key, f"student batch {s.shape[0]} != teacher batch {t.shape[0]}")
        mask = self.token_mask(batch, s, t)
        s, t = _zero_padding(s, mask), _zero_padding(t, mask)
        return functional.kernel_gram_loss(s, t, self.kernel, self.normalize_rows, **self.kernel_params())


class SP(_PairsMethod):
    r"""Similarity-Preserving knowledge distillation: the student's batch similarity matrix
    matches the teacher's,

    .. math:: G = Q Q^\top,\ \tilde G_{a\cdot} = G_{a\cdot}/\|G_{a\cdot}\|_2,\qquad
              \mathcal{L} = \sum_j \frac{1}{N^2}\,\|\tilde G^s_j - \tilde G^t_j\|_F^2

    with :math:`Q` the batch's flattened features (N, D) of layer pair :math:`j` (widths may
    differ). This is the linear kernel with row normalisation of :class:`KFD`; computed by
    :func:`distillx.functional.kernel_gram_loss` with ``kernel="linear", normalize_rows=True``
    (O(N·D²) when D < N). Padding tokens of token features are left out as in :class:`KFD`.

    Paper: F. Tung, G. Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019,
    arXiv:1907.09682 (its γ = 3000 is the usual weight on CIFAR).

    Options:
        student, teacher: layer paths (or lists paired by position); default ``"penultimate"``.
        reduction, reduction_kwargs: a capture-time reduction of both features (``"masked_mean"``).
        weight: multiplier of this loss in the total (default 1.0).

    Example::

        sp = dx.method("sp", student=["layer2", "layer3"], teacher=["layer2", "layer3"], weight=3000.0)

        # in a run config
        {"name": "sp", "student": "layer3", "teacher": "layer3", "weight": 3000.0}
    """

    name = "sp"
    options = {"student": PENULTIMATE, "teacher": PENULTIMATE, **CAPTURE_OPTIONS}

    def pair_loss(self, key, student, teacher, batch=None):
        s, t = self.rows(student, key, "student"), self.rows(teacher, key, "teacher")
        if s.shape[0] != t.shape[0]:
            raise self.feature_error(key, f"student batch {s.shape[0]} != teacher batch {t.shape[0]}")
        mask = self.token_mask(batch, s, t)
        s, t = _zero_padding(s, mask), _zero_padding(t, mask)
        return functional.kernel_gram_loss(s, t, "linear", normalize_rows=True)


class NST(_KernelMethod):
    r"""Neuron Selectivity Transfer: match the distributions of neuron selectivity patterns with a
    kernel MMD.

    For feature maps ``(B, C, H, W)`` each channel's spatial response is one sample of the
    distribution: per image :math:`b`, the rows :math:`f^b_{c} = F_{b,c,\cdot}/\|F_{b,c,\cdot}\|_2`
    (``C`` rows of width ``H·W``). Per image and layer pair :math:`j`,

    .. math:: \mathrm{MMD}^2 = \frac{1}{C_s^2}\sum_{c,c'} k(s_c, s_{c'})
              + \frac{1}{C_t^2}\sum_{c,c'} k(t_c, t_{c'}) - \frac{2}{C_s C_t}\sum_{c,c'} k(s_c, t_{c'}),

    and :math:`\mathcal{L} = \sum_j \operatorname{mean}_b \mathrm{MMD}^2`. Channel counts
    :math:`C_s`, :math:`C_t` may differ; when spatial sizes differ, the larger map is
    average-pooled to the smaller one first (so the widths H·W agree). Token features ``(B, L, D)``
    work the same way with each channel's pattern over the sample's tokens (``D`` rows of width
    ``L``), the padding tokens of a batch with an ``attention_mask`` left out. Computed by
    :func:`distillx.functional.mmd_loss` per image.

    The default kernel is the paper's polynomial kernel with d = 2, c = 0. distillx's polynomial
    kernel is :math:`(\langle x,z\rangle/D + c)^d`, so with c = 0 the loss is the paper's divided by
    :math:`D^2 = (HW)^2`; scale ``weight`` accordingly (or use the ``linear``, ``rbf`` kernels).

    Paper: Z. Huang, N. Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
    Transfer", arXiv:1707.01219, 2017.

    Options:
        student, teacher: layer paths of feature maps (or lists paired by position); required.
        kernel: kernel name or callable (default ``"polynomial"``).
        degree, coef0: polynomial kernel (defaults here 2 and 0, the paper's); sigma2, order, eps,
            scale: as in :class:`KFD`.
        reduction, reduction_kwargs: a capture-time reduction of both features (default none).
        weight: multiplier of this loss in the total (default 1.0).

    Example::

        nst = dx.method("nst", student="layer3", teacher="layer3", weight=50.0)

        # in a run config
        {"name": "nst", "student": "layer3", "teacher": "layer3", "kernel": "polynomial", "weight": 50.0}
    """

    name = "nst"
    options = {"student": None, "teacher": None, "kernel": "polynomial", **dict.fromkeys(KERNEL_OPTIONS),
               **CAPTURE_OPTIONS}
    kernel_defaults = {"polynomial": {"degree": 2, "coef0": 0.0}}

    def pair_loss(self, key, student, teacher, batch=None):
        what = "feature maps (B, C, H, W) or tokens (B, L, D)"
        s = self.require_feature(student, key, "student", ndim=(3, 4), what=what)
        t = self.require_feature(teacher, key, "teacher", ndim=(s.dim(),), what=f"the student's rank: {what}")
        if s.shape[0] != t.shape[0]:
            raise self.feature_error(key, f"student batch {s.shape[0]} != teacher batch {t.shape[0]}")
        if s.dim() == 3:
            return self._token_loss(key, s, t, self.token_mask(batch, s, t))
        size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
        if tuple(s.shape[2:]) != size:
            s = F.adaptive_avg_pool2d(s, size)
        if tuple(t.shape[2:]) != size:
            t = F.adaptive_avg_pool2d(t, size)
        s = F.normalize(s.flatten(2), dim=2)  # (B, Cs, HW): each channel's spatial pattern, unit norm
        t = F.normalize(t.detach().flatten(2), dim=2)
        params = self.kernel_params()
        per_image = [functional.mmd_loss(s[b], t[b], self.kernel, **params) for b in range(s.shape[0])]
        return torch.stack(per_image).mean()

    def _token_loss(self, key, s, t, mask):
        """Tokens (B, L, D): each channel's pattern over the sample's real tokens is one row (D rows)."""
        if s.shape[1] != t.shape[1]:
            raise self.feature_error(key, f"token features need the same length: student {tuple(s.shape)}, "
                                          f"teacher {tuple(t.shape)}")
        params, per_sample = self.kernel_params(), []
        for b in range(s.shape[0]):
            sb, tb = (s[b], t[b].detach()) if mask is None else (s[b][mask[b]], t[b].detach()[mask[b]])
            if sb.shape[0] == 0:  # a sample of padding only: nothing to compare
                continue
            per_sample.append(functional.mmd_loss(F.normalize(sb.t(), dim=1), F.normalize(tb.t(), dim=1),
                                                  self.kernel, **params))
        return torch.stack(per_sample).mean() if per_sample else s.sum() * 0


__all__ = ["KFD", "SP", "NST", "KERNEL_OPTIONS"]
