"""What the attention methods (``minilm``, ``minilmv2``, ``tinybert_attn``) share: which layers, where
their q/k/v projections are, how many heads, and the padding mask.

All three read the query/key/value projections of a self-attention layer as the *outputs of its
q/k/v projection modules*, tokens first: ``(B, L, H)`` with ``H = heads · head_dim``. Per side:

* ``student``/``teacher`` name the layer: ``"last"`` (the default), an index into the model's layer
  stack (``-1``, ``3``), or a dotted path (``"encoder.layer.-1.attention.self"``, or a whole layer);
  a list pairs several layers by position. When the Distiller starts (:meth:`Method.bind`) the
  projections and head counts are found from module names and ``model.config``
  (:mod:`distillx.hf.attention`: BERT/RoBERTa ``query``/``key``/``value``, DistilBERT ``q_lin``/...,
  LLaMA/Mistral/Qwen ``q_proj``/... with grouped-query k/v, GPT-2's fused ``c_attn``).
* ``projections=("wq", "wk", "wv")`` names the submodules instead; explicit paths win over
  everything: ``student_q="blocks.5.attn.wq"``, ``student_k=...``, ``student_v=...`` (and
  ``teacher_q``/...); so do ``student_heads``/``teacher_heads``.

Paths accept negative indices and the ``"PATH[@input][:SELECT]"`` shorthand. ``nn.MultiheadAttention``
packs q/k/v into one ``in_proj`` matrix and has no such submodules: capture attention scores
(``tinybert_attn``'s ``student_scores``/``teacher_scores``) instead.

Padding: option ``key_padding_mask`` is None (the default: the batch's ``attention_mask`` when it
has one), False (no masking) or a callable ``batch -> (B, L) bool`` (True = real token; the
Distiller's ``batch`` is the ``(inputs, targets)`` pair).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from .. import functional
from ..features import FeaturePathError, resolve_module, unwrap_model
from ..hf.attention import AttentionLayout, find_attention, is_attention, layout_at
from .base import FeatureRequest, Method

PROJECTIONS = ("q", "k", "v")
DEFAULT_PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # used before bind() for plain attention paths


def _layers(value: Any) -> Optional[list]:
    """A layer option as a list (None when unset, [] when malformed)."""
    if value is None:
        return None
    values = [value] if isinstance(value, (str, int)) else list(value) if isinstance(value, (list, tuple)) else None
    if not values or any(isinstance(v, bool) or not isinstance(v, (str, int)) or v == "" for v in values):
        return []
    return values


def _is_path(layer: Any) -> bool:
    return isinstance(layer, str) and layer != "last" and not layer.lstrip("+-").isdigit()


class AttentionMethod(Method):
    """Shared option handling of the attention methods (see the module docstring)."""

    uses_logits = False
    options = {"student": "last", "teacher": "last", "projections": None,
               "student_q": None, "student_k": None, "student_v": None,
               "teacher_q": None, "teacher_k": None, "teacher_v": None,
               "student_heads": None, "teacher_heads": None, "key_padding_mask": None}
    #: which of q/k/v this method reads
    uses: tuple[str, ...] = PROJECTIONS
    #: whether the loss splits q/k/v into the models' own heads (bind() then fails early without them)
    needs_heads: bool = True

    def used_projections(self) -> tuple[str, ...]:
        return self.uses

    def validate(self) -> None:
        projections = self.projections
        if projections is not None and (not isinstance(projections, (list, tuple)) or len(projections) != 3
                                        or any(not isinstance(p, str) or not p for p in projections)):
            raise ValueError(f"method {self.name!r}: option projections must be None (found from the model) or the "
                             f"three submodule names of the q, k and v projections, e.g. ('q_proj', 'k_proj', "
                             f"'v_proj'), got {projections!r}")
        for side in ("student", "teacher"):
            if _layers(getattr(self, side)) == []:
                raise ValueError(f"method {self.name!r}: option {side} must be 'last', a layer index, an "
                                 f"attention-module path or a list of them, got {getattr(self, side)!r}")
            for proj in PROJECTIONS:
                if _layers(getattr(self, f"{side}_{proj}")) == [] or any(
                        not isinstance(p, str) for p in _layers(getattr(self, f"{side}_{proj}")) or ()):
                    raise ValueError(f"method {self.name!r}: option {side}_{proj} must be a module path or a list "
                                     f"of them, got {getattr(self, f'{side}_{proj}')!r}")
        kpm = self.key_padding_mask
        if kpm is not None and kpm is not False and not callable(kpm):
            raise ValueError(f"method {self.name!r}: option key_padding_mask must be None (the batch's attention_mask), "
                             f"False (no masking) or a callable batch -> (B, L) bool tensor, got {kpm!r}")
        self.check_int("student_heads", ge=1, optional=True)
        self.check_int("teacher_heads", ge=1, optional=True)
        self._layouts: dict[str, list[Optional[AttentionLayout]]] = {}
        self._chunks: dict[tuple[str, str], list[dict]] = {}
        self._heads = {"student": self.student_heads, "teacher": self.teacher_heads}
        self._kv_heads = dict(self._heads)
        self._paths = {}
        for side in ("student", "teacher"):
            for proj in self.used_projections():
                paths = self._static_paths(side, proj)
                if paths is not None:
                    self._paths[side, proj] = paths
        self._num_pairs = self._check_pair_counts()

    # -- resolving paths and heads ------------------------------------------------------------
    def _static_paths(self, side: str, proj: str) -> Optional[list[str]]:
        """The capture paths known without the model: explicit ones, or plain paths + projection names."""
        explicit = _layers(getattr(self, f"{side}_{proj}"))
        if explicit is not None:
            return explicit
        layers = _layers(getattr(self, side))
        if not all(_is_path(layer) for layer in layers):
            return None
        name = (self.projections or DEFAULT_PROJECTIONS)[PROJECTIONS.index(proj)]
        return [f"{layer}.{name}" for layer in layers]

    def _check_pair_counts(self) -> int:
        counts = {}
        for side in ("student", "teacher"):
            for proj in self.used_projections():
                explicit = _layers(getattr(self, f"{side}_{proj}"))
                counts[f"{side}_{proj}"] = len(explicit if explicit is not None else _layers(getattr(self, side)))
        if len(set(counts.values())) > 1:
            raise ValueError(f"method {self.name!r}: the student and teacher layers are paired by position, but the "
                             f"options give different numbers of layers: "
                             + ", ".join(f"{k}: {v}" for k, v in counts.items()))
        return next(iter(counts.values()))

    def bind(self, student, teacher) -> None:
        """Find each side's attention layers, q/k/v capture paths and head counts in the models."""
        for side, model in (("student", student), ("teacher", teacher)):
            explicit = all(getattr(self, f"{side}_{p}") is not None for p in self.used_projections())
            layers = _layers(getattr(self, side))
            layouts = []
            for i in range(self._num_pairs):
                if explicit:
                    parent = self._paths[side, self.used_projections()[0]][i].split(":")[0].rpartition(".")[0]
                    layouts.append(_layout_or_none(model, parent, self.projections))
                else:
                    layouts.append(find_attention(model, layers[i], self.projections, side))
            self._layouts[side] = layouts
            for proj in self.used_projections():
                given = _layers(getattr(self, f"{side}_{proj}"))
                paths, chunks = [], []
                for i, layout in enumerate(layouts):
                    if given is not None or layout is None:
                        paths.append(given[i])
                        chunks.append({"chunks": 1, "index": 0})
                    else:
                        path, opts = layout.capture(proj)
                        paths.append(path)
                        chunks.append(opts)
                self._paths[side, proj] = paths
                self._chunks[side, proj] = chunks
            first = next((layout for layout in layouts if layout is not None), None)
            option = getattr(self, f"{side}_heads")
            if first is not None and first.heads is not None and option in (None, first.heads):
                self._heads[side], self._kv_heads[side] = first.heads, first.kv_heads
            else:
                self._heads[side] = self._kv_heads[side] = option
            if self.needs_heads:
                self.heads_known(side)
        self.check_bound()

    def check_bound(self) -> None:
        """Checks that need the resolved head counts (subclasses); raise ValueError naming both sides."""

    def features(self) -> list[FeatureRequest]:
        missing = [f"{side}" for side in ("student", "teacher")
                   if any((side, p) not in self._paths for p in self.used_projections())]
        if missing:
            raise ValueError(f"method {self.name!r}: the {' and '.join(missing)} layer "
                             f"({', '.join(repr(getattr(self, s)) for s in missing)}) is found in the model: the "
                             "Distiller does it when it starts; used on its own, call method.bind(student, teacher) "
                             "first (or give attention-module paths)")
        out = []
        for i in range(self._num_pairs):
            for proj in self.used_projections():
                s, t = self._paths["student", proj][i], self._paths["teacher", proj][i]
                cs = self._chunks.get(("student", proj), [None] * (i + 1))[i]
                ct = self._chunks.get(("teacher", proj), [None] * (i + 1))[i]
                if (cs and cs["chunks"] > 1) or (ct and ct["chunks"] > 1):
                    out.append(FeatureRequest(f"{proj}{i}", s, t, reduction="chunk",
                                              student_reduction_kwargs=cs or {"chunks": 1, "index": 0},
                                              teacher_reduction_kwargs=ct or {"chunks": 1, "index": 0}))
                else:
                    out.append(FeatureRequest(f"{proj}{i}", s, t))
        return out

    def head_count(self, side: str, proj: str = "q") -> Optional[int]:
        return self._heads[side] if proj == "q" else self._kv_heads[side]

    def heads_known(self, side: str) -> int:
        heads = self._heads[side]
        if heads is None:
            raise ValueError(f"method {self.name!r}: the {side}'s attention head count is unknown: give "
                             f"{side}_heads, or let the Distiller read it from model.config (num_attention_heads)")
        return heads

    # -- helpers -------------------------------------------------------------------------------
    def tokens(self, outputs: Mapping[str, Any], key: str, side: str) -> torch.Tensor:
        return self.require_feature(outputs, key, side, ndim=(3,),
                                    what="the output of a q/k/v projection, tokens (B, L, H)")

    def heads(self, x: torch.Tensor, num_heads: int, key: str, side: str, option: str) -> torch.Tensor:
        """``(B, L, H) -> (B, A, L, H/A)``, or an error naming the layer when A does not divide H."""
        if x.shape[-1] % num_heads:
            raise self.feature_error(key, f"the {side} projection width {x.shape[-1]} is not divisible by "
                                          f"{option}={num_heads}", side)
        return functional.split_relation_heads(x, num_heads)

    def per_head(self, x: torch.Tensor, side: str, proj: str, key: str) -> torch.Tensor:
        """q/k/v split into the model's own heads; grouped-query k/v repeated to the query heads."""
        heads = self.heads_known(side)
        kv = self.head_count(side, proj) or heads
        y = self.heads(x, kv if proj != "q" else heads, key, side, f"{side}_heads")
        return y.repeat_interleave(heads // kv, dim=1) if proj != "q" and kv != heads else y

    def padding_mask(self, batch: Any, shape: tuple[int, int], key: str) -> Optional[torch.Tensor]:
        kpm = self.key_padding_mask
        if kpm is False:
            return None
        if kpm is None:
            return self.attention_mask(batch, shape, key)
        mask = kpm(batch)
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(shape):
            got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else \
                type(mask).__name__
            raise self.feature_error(key, f"key_padding_mask(batch) must return a bool tensor of shape {shape} "
                                          f"(batch, tokens), got a {got}")
        return mask

    def check_tokens(self, key: str, s: torch.Tensor, t: torch.Tensor) -> None:
        if s.shape[:2] != t.shape[:2]:
            raise self.feature_error(key, f"student {tuple(s.shape)} and teacher {tuple(t.shape)} must agree in "
                                          "batch and sequence length (B, L)")


def _layout_or_none(model, path: str, projections) -> Optional[AttentionLayout]:
    """The layout of an attention module named through explicit q/k/v paths, for its head counts."""
    try:
        module, path = resolve_module(model, path)
    except (FeaturePathError, TypeError):
        return None
    return layout_at(unwrap_model(model), path, projections) if is_attention(module, projections) else None


__all__ = ["AttentionMethod", "PROJECTIONS"]
