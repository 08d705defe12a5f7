"""Simple linear distillation (``sld``): FitNets hints through a learned adapter."""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import adapters as _adapters
from .base import CAPTURE_OPTIONS, PENULTIMATE, FeatureRequest, Method, layer_pairs


class SLD(Method):
    r"""Simple linear distillation (FitNets hints): the student's feature, through a learned adapter
    :math:`r`, regresses the teacher's raw feature with the mean squared error

    .. math:: \mathcal{L} = \sum_{j} \operatorname{mean}\big(r_j(F^s_j) - F^t_j\big)^2

    over the layer pairs :math:`j` (one pair by default: the penultimate features). The teacher
    feature is a constant. Adapters (:mod:`distillx.methods.adapters`):

    - vectors ``(B, D)`` and tokens ``(B, L, D)``: ``Linear(Ds, Dt)`` on the last dim (``L`` must
      match);
    - feature maps ``(B, C, H, W)``: 1×1 ``Conv2d(Cs, Ct, bias=False)`` + ``BatchNorm2d(Ct)``; when
      the spatial sizes differ, the larger map (adapted student or teacher) is average-pooled to the
      smaller size.

    With ``adapter="auto"`` a pair whose widths already agree uses no adapter (identity). Token
    features of a batch with an ``attention_mask`` are compared on the real tokens only.

    When adapters are built: from the observed shapes, lazily: the :class:`~distillx.Distiller`
    runs one dry forward pass of both models on the first batch (``eval()`` mode, no gradient)
    and calls :meth:`setup` *before* it builds the optimizer, so the adapters are trained with the
    student. Give ``student_width`` and ``teacher_width`` (with ``adapter="linear"`` or
    ``"conv"``) to build them eagerly at construction instead. Used outside the Distiller, call
    ``method.setup(student_feats, teacher_feats)`` once, then put ``method.parameters()`` in your
    optimizer.

    Paper: A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio, "FitNets: Hints for
    Thin Deep Nets", ICLR 2015, arXiv:1412.6550.

    Options:
        student, teacher: layer path of the hint (teacher) and guided (student) layer, or lists of
            paths paired by position (default ``"penultimate"``: the input of the output layer).
            Paths take the ``"PATH[@input][:SELECT]"`` shorthand.
        adapter: ``"auto"`` (default: linear or conv by the feature's shape, none when widths
            agree), ``"linear"``, ``"conv"`` or ``"identity"``.
        student_width, teacher_width: feature widths (last dim for vectors/tokens, channels for
            maps), an int or a list per pair, to build the adapters eagerly.
        reduction, reduction_kwargs: a capture-time reduction of both features, e.g.
            ``reduction="masked_mean"`` to match sentence embeddings (mean over the real tokens of a
            transformer layer's output) through the adapter.
        weight: multiplier of this loss in the total (default 1.0).

    Example::

        import distillx as dx
        hint = dx.method("sld", student="layer2", teacher="layer3", weight=1.0)          # lazy adapter
        hint = dx.method("sld", student="fc1", teacher="fc1", adapter="linear",
                         student_width=64, teacher_width=256)                            # eager

        # in a run config
        {"name": "sld", "student": "layer2", "teacher": "layer3", "weight": 1.0}
    """

    uses_teacher_logits = False
    name = "sld"
    uses_logits = False
    options = {"student": PENULTIMATE, "teacher": PENULTIMATE, "adapter": "auto",
               "student_width": None, "teacher_width": None, **CAPTURE_OPTIONS}

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.adapters = nn.ModuleDict()
        if self.student_width is not None:
            for i, (ws, wt) in enumerate(zip(self._widths("student_width"), self._widths("teacher_width"))):
                self.adapters[str(i)] = _adapters.build_adapter(self.adapter, ws, wt)

    def validate(self) -> None:
        self._pairs = layer_pairs(self.name, self.student, self.teacher)
        self.check_capture_options()
        self.check_choice("adapter", _adapters.ADAPTERS)
        given = [w is not None for w in (self.student_width, self.teacher_width)]
        if any(given):
            if not all(given):
                raise ValueError(f"method {self.name!r}: give both student_width and teacher_width (or neither, "
                                 "to build adapters from the observed shapes)")
            if self.adapter == "auto":
                raise ValueError(f"method {self.name!r}: with student_width/teacher_width, say which adapter to "
                                 "build: adapter='linear' (vectors, tokens) or 'conv' (feature maps)")
            for option in ("student_width", "teacher_width"):
                self._widths(option)

    def _widths(self, option: str) -> list[int]:
        value = getattr(self, option)
        values = list(value) if isinstance(value, (list, tuple)) else [value] * len(self._pairs)
        if len(values) != len(self._pairs) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                                   for v in values):
            raise ValueError(f"method {self.name!r}: option {option} must be a positive int or a list of "
                             f"{len(self._pairs)} of them (one per layer pair), got {value!r}")
        return values

    def features(self) -> list[FeatureRequest]:
        return [self.layer_request(f"pair{i}", s, t) for i, (s, t) in enumerate(self._pairs)]

    @property
    def needs_setup(self) -> bool:
        return len(self.adapters) < len(self._pairs)

    def setup(self, student: Mapping[str, Any], teacher: Mapping[str, Any]) -> None:
        for i in range(len(self._pairs)):
            if str(i) in self.adapters:
                continue
            key = f"pair{i}"
            s = self.require_feature(student, key, "student", ndim=(2, 3, 4),
                                     what="vectors (B, D), tokens (B, L, D) or maps (B, C, H, W)")
            t = self.require_feature(teacher, key, "teacher", ndim=(2, 3, 4),
                                     what="vectors (B, D), tokens (B, L, D) or maps (B, C, H, W)")
            try:
                self.adapters[str(i)] = _adapters.adapter_for(s, t, self.adapter)
            except ValueError as e:
                raise self.feature_error(key, str(e)) from None

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None) -> torch.Tensor:
        if self.needs_setup:
            raise RuntimeError(f"method {self.name!r}: its adapters are built from the first features it sees; "
                               "call method.setup(student_feats, teacher_feats) once before loss() and add "
                               "method.parameters() to the optimizer (distillx.Distiller does both), or give "
                               "student_width/teacher_width")
        total = None
        for i in range(len(self._pairs)):
            key = f"pair{i}"
            s = self.require_feature(student, key, "student", ndim=(2, 3, 4),
                                     what="vectors (B, D), tokens (B, L, D) or maps (B, C, H, W)")
            t = self.require_feature(teacher, key, "teacher", ndim=(s.dim(),),
                                     what=f"the student's rank ({s.dim()}-D, student shape {tuple(s.shape)})")
            adapter = self.adapters[str(i)]
            kind = "conv" if isinstance(adapter, _adapters.ConvAdapter) else (
                "linear" if isinstance(adapter, nn.Linear) else "identity")
            if kind != "identity" and _adapters.adapter_kind(s) != kind:
                raise self.feature_error(key, f"the student feature {tuple(s.shape)} does not fit the {kind} "
                                              "adapter (linear: (B, D)/(B, L, D); conv: (B, C, H, W))", "student")
            width = _adapters.feature_width(s, "conv" if s.dim() == 4 else "linear")
            expected = adapter.in_channels if kind == "conv" else adapter.in_features if kind == "linear" else None
            if expected is not None and width != expected:
                raise self.feature_error(key, f"the student feature has width {width} but the adapter expects "
                                              f"{expected} (student_width)", "student")
            y = adapter(s.to(_param_dtype(adapter, s)))
            if s.dim() == 3 and y.shape[1] != t.shape[1]:
                raise self.feature_error(key, f"token features need the same length: student {tuple(s.shape)}, "
                                              f"teacher {tuple(t.shape)}")
            wy = _adapters.feature_width(y, "conv" if y.dim() == 4 else "linear")
            wt = _adapters.feature_width(t, "conv" if t.dim() == 4 else "linear")
            if wy != wt:
                raise self.feature_error(key, f"the (adapted) student width {wy} does not match the teacher width "
                                              f"{wt}" + (" (adapter='identity' needs equal widths)"
                                                         if kind == "identity" else " (teacher_width)"))
            if y.dim() == 4 and y.shape[-2:] != t.shape[-2:]:
                size = (min(y.shape[-2], t.shape[-2]), min(y.shape[-1], t.shape[-1]))
                y = F.adaptive_avg_pool2d(y, size) if tuple(y.shape[-2:]) != size else y
                t = F.adaptive_avg_pool2d(t, size) if tuple(t.shape[-2:]) != size else t
            mask = self.attention_mask(batch)
            if mask is not None and y.dim() == 3 and tuple(y.shape[:2]) == tuple(mask.shape):
                y, t = y[mask], t[mask]  # tokens: padding is out of the loss
            term = F.mse_loss(y, t.detach().to(y.dtype))
            total = term if total is None else total + term
        return total


def _param_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    """Feed an adapter in its parameters' dtype (autocast, when active, still decides the compute dtype)."""
    p = next(module.parameters(), None)
    return x.dtype if p is None else p.dtype


__all__ = ["SLD"]
