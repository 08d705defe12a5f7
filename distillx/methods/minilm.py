"""Attention distillation for transformers: MiniLM (``minilm``), MiniLMv2 (``minilmv2``) and
TinyBERT's attention-score loss (``tinybert_attn``).

All three read the query/key/value projections of a self-attention layer as the *outputs of its
q/k/v ``nn.Linear`` submodules*, tokens first: ``(B, L, H)`` with ``H = heads · head_dim``. Name them
per side in one of two ways:

* the attention module and the projection names: ``student="encoder.layers.-1.self_attn"`` with
  ``projections=("q_proj", "k_proj", "v_proj")`` (the default; Hugging Face BERT uses
  ``("query", "key", "value")``), giving ``encoder.layers.-1.self_attn.q_proj`` etc.;
* explicit paths, which win: ``student_q="blocks.5.attn.wq"``, ``student_k=...``, ``student_v=...``
  (and ``teacher_q``/``teacher_k``/``teacher_v``).

Paths accept negative indices (``layers.-1``: the last layer) and the ``"PATH[@input][:SELECT]"``
shorthand. ``nn.MultiheadAttention`` packs q/k/v into one ``in_proj`` matrix and has no such
submodules: write the attention with separate projections, or capture attention scores
(``tinybert_attn``'s ``student_scores``/``teacher_scores``).

Padding: option ``key_padding_mask`` is None or a callable ``batch -> (B, L) bool`` (True = real
token); the Distiller's ``batch`` is the ``(inputs, targets)`` pair.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from .. import functional
from .base import FeatureRequest, Method

PROJECTIONS = ("q", "k", "v")


def _as_paths(value: Any) -> Optional[list[str]]:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not values or any(not isinstance(v, str) or not v for v in values):
        return []
    return values


class _AttentionMethod(Method):
    """Shared option handling: attention-module paths + projection names, or explicit q/k/v paths."""

    uses_teacher_logits = False

    options = {"student": None, "teacher": None, "projections": ("q_proj", "k_proj", "v_proj"),
               "student_q": None, "student_k": None, "student_v": None,
               "teacher_q": None, "teacher_k": None, "teacher_v": None,
               "key_padding_mask": None}
    #: which of q/k/v this method reads
    uses: tuple[str, ...] = PROJECTIONS

    def used_projections(self) -> tuple[str, ...]:
        return self.uses

    def validate(self) -> None:
        projections = self.projections
        if (not isinstance(projections, (list, tuple)) or len(projections) != 3
                or any(not isinstance(p, str) or not p for p in projections)):
            raise ValueError(f"method {self.name!r}: option projections must be the three submodule names of the "
                             f"q, k and v projections, e.g. ('q_proj', 'k_proj', 'v_proj'), got {projections!r}")
        for side in ("student", "teacher"):
            if _as_paths(getattr(self, side)) == []:
                raise ValueError(f"method {self.name!r}: option {side} must be an attention-module path or a list "
                                 f"of them, got {getattr(self, side)!r}")
            for proj in PROJECTIONS:
                if _as_paths(getattr(self, f"{side}_{proj}")) == []:
                    raise ValueError(f"method {self.name!r}: option {side}_{proj} must be a module path or a list "
                                     f"of them, got {getattr(self, f'{side}_{proj}')!r}")
        if self.key_padding_mask is not None and not callable(self.key_padding_mask):
            raise ValueError(f"method {self.name!r}: option key_padding_mask must be None or a callable "
                             f"batch -> (B, L) bool tensor, got {self.key_padding_mask!r}")
        self._paths = {(side, proj): self._resolve(side, proj)
                       for side in ("student", "teacher") for proj in self.used_projections()}
        self._num_pairs = self._check_pair_counts(self._paths)

    def _resolve(self, side: str, proj: str) -> list[str]:
        explicit = _as_paths(getattr(self, f"{side}_{proj}"))
        if explicit is not None:
            return explicit
        base = _as_paths(getattr(self, side))
        if base is None:
            raise ValueError(f"method {self.name!r}: give option {side} (the path of the {side}'s attention "
                             f"module, e.g. 'encoder.layers.-1.self_attn') or the projection paths "
                             f"{side}_q/{side}_k/{side}_v")
        name = self.projections[PROJECTIONS.index(proj)]
        return [f"{b}.{name}" for b in base]

    def _check_pair_counts(self, paths: Mapping[tuple[str, str], list[str]]) -> int:
        counts = {f"{side}_{proj}": len(p) for (side, proj), p in paths.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(f"method {self.name!r}: the student and teacher layers are paired by position, but the "
                             f"options give different numbers of layers: "
                             + ", ".join(f"{k}: {v}" for k, v in counts.items()))
        return next(iter(counts.values()))

    def features(self) -> list[FeatureRequest]:
        return [FeatureRequest(f"{proj}{i}", self._paths["student", proj][i], self._paths["teacher", proj][i])
                for i in range(self._num_pairs) for proj in self.used_projections()]

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

    def padding_mask(self, batch: Any, shape: tuple[int, int], key: str) -> Optional[torch.Tensor]:
        if self.key_padding_mask is None:
            return None
        mask = self.key_padding_mask(batch)
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

    def check_heads_option(self, option: str, required: bool = True) -> None:
        self.check_int(option, ge=1, optional=not required)


class MiniLM(_AttentionMethod):
    r"""MiniLM deep self-attention distillation: the student's self-attention distributions and
    value relations of one layer pair (the last layers in the paper) match the teacher's.

    With per-head :math:`Q, K, V \in \mathbb{R}^{B \times A \times L \times d}` (``A`` heads; the
    student's head width :math:`d_s` and the teacher's :math:`d_t` may differ),

    .. math:: \mathcal{L} = \frac{1}{A L}\sum_{a,l} \mathrm{KL}\big(
                  \mathrm{softmax}(Q^t K^{t\top}/\sqrt{d_t}) \,\|\, \mathrm{softmax}(Q^s K^{s\top}/\sqrt{d_s})\big)_{a,l}
              + \frac{1}{A L}\sum_{a,l} \mathrm{KL}\big(
                  \mathrm{softmax}(V^t V^{t\top}/\sqrt{d_t}) \,\|\, \mathrm{softmax}(V^s V^{s\top}/\sqrt{d_s})\big)_{a,l}

    averaged over the batch (padded query rows skipped, padded keys masked). Both terms are
    :func:`distillx.functional.attention_relation_loss`. The head counts must be equal (the
    distributions are compared head by head); use ``minilmv2`` otherwise.

    Paper: W. Wang, F. Wei, L. Dong, H. Bao, N. Yang, M. Zhou, "MiniLM: Deep Self-Attention
    Distillation for Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020,
    arXiv:2002.10957.

    Options:
        student, teacher: path of the attention module holding the q/k/v projections (or a list,
            paired by position; terms are summed); or explicit ``student_q``/``student_k``/
            ``student_v`` and ``teacher_q``/... paths (see :mod:`distillx.methods.minilm`).
        projections: names of the q, k, v submodules (default ``("q_proj", "k_proj", "v_proj")``).
        student_heads, teacher_heads: attention head counts; required and equal.
        key_padding_mask: None or ``batch -> (B, L)`` bool (True = real token).
        weight: multiplier of this loss in the total (default 1.0).

    Example::

        minilm = dx.method("minilm", student="encoder.layers.-1.self_attn",
                           teacher="encoder.layers.-1.self_attn", student_heads=12, teacher_heads=12)

        # in a run config (Hugging Face BERT naming)
        {"name": "minilm", "student": "bert.encoder.layer.-1.attention.self",
         "teacher": "bert.encoder.layer.-1.attention.self", "projections": ["query", "key", "value"],
         "student_heads": 12, "teacher_heads": 12}
    """

    name = "minilm"
    options = {"student_heads": None, "teacher_heads": None}

    def validate(self) -> None:
        super().validate()
        self.check_heads_option("student_heads")
        self.check_heads_option("teacher_heads")
        if self.student_heads != self.teacher_heads:
            raise ValueError(f"method {self.name!r}: MiniLM compares attention distributions head by head, so the "
                             f"head counts must be equal: student_heads={self.student_heads} (student "
                             f"{self._paths['student', 'q'][0]!r}) and teacher_heads={self.teacher_heads} (teacher "
                             f"{self._paths['teacher', 'q'][0]!r}); use 'minilmv2', whose relation heads pair "
                             "different head counts")

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None) -> torch.Tensor:
        total = None
        for i in range(self._num_pairs):
            x = {}
            for proj in PROJECTIONS:
                key = f"{proj}{i}"
                s, t = self.tokens(student, key, "student"), self.tokens(teacher, key, "teacher")
                self.check_tokens(key, s, t)
                x[proj] = (self.heads(s, self.student_heads, key, "student", "student_heads"),
                           self.heads(t, self.teacher_heads, key, "teacher", "teacher_heads"))
            mask = self.padding_mask(batch, tuple(x["q"][0].shape[:1] + x["q"][0].shape[2:3]), f"q{i}")
            (qs, qt), (ks, kt), (vs, vt) = x["q"], x["k"], x["v"]
            term = (functional.attention_relation_loss(qs, ks, qt, kt, key_padding_mask=mask)
                    + functional.attention_relation_loss(vs, vs, vt, vt, key_padding_mask=mask))
            total = term if total is None else total + term
        return total


class MiniLMv2(_AttentionMethod):
    r"""MiniLMv2 multi-head self-attention relation distillation: Q-Q, K-K and V-V relations over
    ``num_relation_heads`` re-split heads, so teacher and student may differ in head count and width.

    Each projection :math:`X \in \{Q, K, V\}` of shape ``(B, L, H)`` is concatenated over heads
    and re-split into :math:`A_r` relation heads of width :math:`H/A_r`
    (:func:`distillx.functional.split_relation_heads`); then

    .. math:: \mathcal{L} = \sum_{X \in \{Q,K,V\}} \frac{1}{A_r L}\sum_{a,l}
              \mathrm{KL}\big(\mathrm{softmax}(X^t_a X^{t\top}_a/\sqrt{d^t_r}) \,\|\,
              \mathrm{softmax}(X^s_a X^{s\top}_a/\sqrt{d^s_r})\big)_{l}

    averaged over the batch (:func:`distillx.functional.attention_relation_loss` with ``k is q``).
    The paper distils one teacher layer (an upper-middle one for large teachers) into the
    student's last layer.

    Paper: W. Wang, H. Bao, S. Huang, L. Dong, F. Wei, "MiniLMv2: Multi-Head Self-Attention Relation
    Distillation for Compressing Pretrained Transformers", Findings of ACL 2021, arXiv:2012.15828.

    Options:
        student, teacher, projections, student_q/... paths, key_padding_mask: as in ``minilm``.
        num_relation_heads: relation heads A_r; must divide both widths (required; the paper uses
            12 for base-size and 48 for large teachers).
        relations: which relations, a subset of ``("qq", "kk", "vv")`` (default all three).
        weight: multiplier of this loss in the total (default 1.0).

    Example::

        v2 = dx.method("minilmv2", student="encoder.layers.-1.self_attn", teacher="encoder.layers.8.self_attn",
                       num_relation_heads=4)

        # in a run config
        {"name": "minilmv2", "student": "encoder.layers.-1.self_attn", "teacher": "encoder.layers.8.self_attn",
         "num_relation_heads": 48}
    """

    name = "minilmv2"
    options = {"num_relation_heads": None, "relations": ("qq", "kk", "vv")}

    def used_projections(self) -> tuple[str, ...]:
        return tuple(p for p in PROJECTIONS if p + p in self.relations)

    def validate(self) -> None:
        rel = self.relations
        if (not isinstance(rel, (list, tuple)) or not rel or len(set(rel)) != len(rel)
                or any(r not in ("qq", "kk", "vv") for r in rel)):
            raise ValueError(f"method {self.name!r}: option relations must be a non-empty subset of "
                             f"('qq', 'kk', 'vv'), got {rel!r}")
        super().validate()
        self.check_heads_option("num_relation_heads")

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None) -> torch.Tensor:
        total, A = None, self.num_relation_heads
        for i in range(self._num_pairs):
            for proj in self.used_projections():
                key = f"{proj}{i}"
                s, t = self.tokens(student, key, "student"), self.tokens(teacher, key, "teacher")
                self.check_tokens(key, s, t)
                rs = self.heads(s, A, key, "student", "num_relation_heads")
                rt = self.heads(t, A, key, "teacher", "num_relation_heads")
                mask = self.padding_mask(batch, (s.shape[0], s.shape[1]), key)
                term = functional.attention_relation_loss(rs, rs, rt, rt, key_padding_mask=mask)
                total = term if total is None else total + term
        return total


class TinyBERTAttention(_AttentionMethod):
    r"""TinyBERT attention-based distillation: MSE between the (unnormalised) attention score
    matrices of paired layers,

    .. math:: \mathcal{L} = \sum_j \operatorname{mean}_{b,h,l,l'}\big(S^s_{j} - S^t_{j}\big)^2_{b,h,l,l'},
              \qquad S = Q K^\top / \sqrt{d_{head}} \in \mathbb{R}^{B \times h \times L \times L}

    The scores are computed per head from the captured q/k projections (``student_heads``,
    ``teacher_heads``), or read directly from a module output of shape ``(B, h, L, L)`` with
    ``student_scores``/``teacher_scores`` (e.g. ``"layers.3.attn:1"`` for element 1 of a tuple
    output). Head counts must be equal: TinyBERT compares the heads one to one. With
    ``key_padding_mask``, only (query, key) pairs of real tokens count (TinyBERT zeroes the others).
    Student layer :math:`j` is usually paired with teacher layer :math:`g(j) = j\cdot M/N`
    (uniform mapping): pass both lists.

    Paper: X. Jiao, Y. Yin, L. Shang, X. Jiang, X. Chen, L. Li, F. Wang, Q. Liu, "TinyBERT:
    Distilling BERT for Natural Language Understanding", Findings of EMNLP 2020, arXiv:1909.10351.

    Options:
        student, teacher: attention-module paths or lists paired by position; or explicit
            ``student_q``/``student_k`` and ``teacher_q``/``teacher_k`` (v is not used).
        projections: names of the q, k, v submodules (default ``("q_proj", "k_proj", "v_proj")``).
        student_heads, teacher_heads: head counts (needed unless scores are captured); equal.
        student_scores, teacher_scores: paths of modules whose output holds the scores (both or
            neither); they replace the q/k capture.
        key_padding_mask: None or ``batch -> (B, L)`` bool.
        weight: multiplier of this loss in the total (default 1.0).

    Example::

        att = dx.method("tinybert_attn", student=["layers.0.attn", "layers.1.attn"],
                        teacher=["layers.1.attn", "layers.3.attn"], student_heads=12, teacher_heads=12)

        # in a run config
        {"name": "tinybert_attn", "student": ["layers.0.attn", "layers.1.attn"],
         "teacher": ["layers.1.attn", "layers.3.attn"], "student_heads": 12, "teacher_heads": 12}
    """

    name = "tinybert_attn"
    options = {"student_heads": None, "teacher_heads": None, "student_scores": None, "teacher_scores": None}
    uses = ("q", "k")

    def validate(self) -> None:
        scores = [_as_paths(self.student_scores), _as_paths(self.teacher_scores)]
        if (scores[0] is None) != (scores[1] is None) or [] in scores:
            raise ValueError(f"method {self.name!r}: give both student_scores and teacher_scores (module paths, "
                             "or lists of them), or neither to compute the scores from q/k")
        self._scores = scores[0] is not None
        if self._scores:
            if len(scores[0]) != len(scores[1]):
                raise ValueError(f"method {self.name!r}: student_scores and teacher_scores must list the same number "
                                 f"of layers, got {len(scores[0])} and {len(scores[1])}")
            self._paths = {("student", "scores"): scores[0], ("teacher", "scores"): scores[1]}
            self._num_pairs = len(scores[0])
            if self.key_padding_mask is not None and not callable(self.key_padding_mask):
                raise ValueError(f"method {self.name!r}: option key_padding_mask must be None or a callable")
        else:
            super().validate()
        self.check_heads_option("student_heads", required=not self._scores)
        self.check_heads_option("teacher_heads", required=not self._scores)
        if None not in (self.student_heads, self.teacher_heads) and self.student_heads != self.teacher_heads:
            raise ValueError(f"method {self.name!r}: TinyBERT compares attention scores head by head, so the head "
                             f"counts must be equal: student_heads={self.student_heads}, "
                             f"teacher_heads={self.teacher_heads}")

    def used_projections(self) -> tuple[str, ...]:
        return ("scores",) if self._scores else self.uses

    def _scores_of(self, outputs: Mapping[str, Any], i: int, side: str) -> torch.Tensor:
        if self._scores:
            return self.require_feature(outputs, f"scores{i}", side, ndim=(4,),
                                        what="attention scores (B, heads, L, L)")
        heads = getattr(self, f"{side}_heads")
        q = self.heads(self.tokens(outputs, f"q{i}", side), heads, f"q{i}", side, f"{side}_heads")
        k = self.heads(self.tokens(outputs, f"k{i}", side), heads, f"k{i}", side, f"{side}_heads")
        return q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None) -> torch.Tensor:
        total = None
        for i in range(self._num_pairs):
            key = f"scores{i}" if self._scores else f"q{i}"
            s, t = self._scores_of(student, i, "student"), self._scores_of(teacher, i, "teacher").detach()
            if s.shape[1] != t.shape[1]:
                raise self.feature_error(key, f"TinyBERT compares attention heads one to one, but the student has "
                                              f"{s.shape[1]} heads and the teacher {t.shape[1]} (scores "
                                              f"{tuple(s.shape)} vs {tuple(t.shape)})")
            if s.shape != t.shape or s.shape[-1] != s.shape[-2]:
                raise self.feature_error(key, f"attention scores must both be (B, heads, L, L) with the same B and "
                                              f"L: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
            diff = (s - t.to(s.dtype)).pow(2)
            mask = self.padding_mask(batch, (s.shape[0], s.shape[-1]), key)
            if mask is None:
                term = diff.mean()
            else:
                pairs = (mask[:, :, None] & mask[:, None, :])[:, None].expand_as(diff)
                term = diff[pairs].mean() if pairs.any() else diff.sum() * 0
            total = term if total is None else total + term
        return total


__all__ = ["MiniLM", "MiniLMv2", "TinyBERTAttention", "PROJECTIONS"]
