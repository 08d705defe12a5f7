"""Attention distillation for transformers: MiniLM (``minilm``), MiniLMv2 (``minilmv2``) and
TinyBERT's attention-score loss (``tinybert_attn``).

Which layers, where their q/k/v projections are and how many heads they have is found in the
models (BERT/RoBERTa, DistilBERT, GPT-2, LLaMA/Mistral/Qwen with grouped-query attention) or given
explicitly; padding follows the batch's ``attention_mask``. See :mod:`distillx.methods.attention`.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .. import functional
from ..hf.attention import relation_heads
from .attention import PROJECTIONS, AttentionMethod, _layers


class MiniLM(AttentionMethod):
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
        student, teacher: the layer: ``"last"`` (default), an index into the layer stack, or the
            path of the attention module (or of a layer holding one); a list pairs several layers by
            position (terms are summed). Or explicit ``student_q``/``student_k``/``student_v`` and
            ``teacher_q``/... paths (see :mod:`distillx.methods.attention`).
        projections: names of the q, k, v submodules (default: found from the model).
        student_heads, teacher_heads: attention head counts (default: ``model.config``); equal.
            Grouped-query k/v heads are repeated to the query heads.
        key_padding_mask: None (the batch's ``attention_mask``), False, or ``batch -> (B, L)`` bool.
        weight: multiplier of this loss in the total (default 1.0).

    Example::

        minilm = dx.method("minilm")                   # last layers of two Hugging Face models
        minilm = dx.method("minilm", student="encoder.layers.-1.self_attn",
                           teacher="encoder.layers.-1.self_attn", student_heads=12, teacher_heads=12)

        # in a run config (Hugging Face BERT naming)
        {"name": "minilm", "student": "bert.encoder.layer.-1.attention.self",
         "teacher": "bert.encoder.layer.-1.attention.self", "projections": ["query", "key", "value"],
         "student_heads": 12, "teacher_heads": 12}
    """

    name = "minilm"

    def validate(self) -> None:
        super().validate()
        self.check_bound()

    def check_bound(self) -> None:
        s, t = self._heads["student"], self._heads["teacher"]
        if None not in (s, t) and s != t:
            where = {side: (self._paths.get((side, "q")) or [getattr(self, side)])[0] for side in ("student", "teacher")}
            raise ValueError(f"method {self.name!r}: MiniLM compares attention distributions head by head, so the "
                             f"head counts must be equal: student_heads={s} (student {where['student']!r}) and "
                             f"teacher_heads={t} (teacher {where['teacher']!r}); use 'minilmv2', whose relation "
                             "heads pair different head counts")

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None) -> torch.Tensor:
        total = None
        for i in range(self._num_pairs):
            x = {}
            for proj in PROJECTIONS:
                key = f"{proj}{i}"
                s, t = self.tokens(student, key, "student"), self.tokens(teacher, key, "teacher")
                self.check_tokens(key, s, t)
                x[proj] = (self.per_head(s, "student", proj, key), self.per_head(t, "teacher", proj, key))
            mask = self.padding_mask(batch, tuple(x["q"][0].shape[:1] + x["q"][0].shape[2:3]), f"q{i}")
            (qs, qt), (ks, kt), (vs, vt) = x["q"], x["k"], x["v"]
            term = (functional.attention_relation_loss(qs, ks, qt, kt, key_padding_mask=mask)
                    + functional.attention_relation_loss(vs, vs, vt, vt, key_padding_mask=mask))
            total = term if total is None else total + term
        return total


class MiniLMv2(AttentionMethod):
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
        num_relation_heads: relation heads A_r; must divide every q/k/v width (the paper uses 12 for
            base-size and 48 for large teachers). Default: the teacher's head count, else the
            student's (the first that divides every width of both models).
        relations: which relations, a subset of ``("qq", "kk", "vv")`` (default all three).
        weight: multiplier of this loss in the total (default 1.0).

    Example::

        v2 = dx.method("minilmv2", teacher=8)           # student's last layer, teacher layer 8, heads found
        v2 = dx.method("minilmv2", student="encoder.layers.-1.self_attn", teacher="encoder.layers.8.self_attn",
                       num_relation_heads=4)

        # in a run config
        {"name": "minilmv2", "student": "encoder.layers.-1.self_attn", "teacher": "encoder.layers.8.self_attn",
         "num_relation_heads": 48}
    """

    name = "minilmv2"
    options = {"num_relation_heads": None, "relations": ("qq", "kk", "vv")}
    needs_heads = False  # relation heads, not the models' own

    def used_projections(self) -> tuple[str, ...]:
        return tuple(p for p in PROJECTIONS if p + p in self.relations)

    def validate(self) -> None:
        rel = self.relations
        if (not isinstance(rel, (list, tuple)) or not rel or len(set(rel)) != len(rel)
                or any(r not in ("qq", "kk", "vv") for r in rel)):
            raise ValueError(f"method {self.name!r}: option relations must be a non-empty subset of "
                             f"('qq', 'kk', 'vv'), got {rel!r}")
        super().validate()
        self.check_int("num_relation_heads", ge=1, optional=True)
        self._relation_heads = self.num_relation_heads

    def check_bound(self) -> None:
        if self.num_relation_heads is None:
            layouts = {side: [x for x in self._layouts.get(side, []) if x is not None] for side in ("student", "teacher")}
            if not layouts["student"] or not layouts["teacher"]:
                raise ValueError(f"method {self.name!r}: give num_relation_heads (the attention layers' head counts "
                                 "are not known for explicit q/k/v paths)")
            try:
                self._relation_heads = relation_heads(layouts["student"], layouts["teacher"], self.used_projections())
            except ValueError as e:
                raise ValueError(f"method {self.name!r}: {e}") from None

    def relation_head_count(self) -> int:
        if self._relation_heads is None:
            raise ValueError(f"method {self.name!r}: num_relation_heads is unknown: give it, or let the Distiller "
                             "find it from the models (method.bind(student, teacher))")
        return self._relation_heads

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None) -> torch.Tensor:
        total, A = None, self.relation_head_count()
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


class TinyBERTAttention(AttentionMethod):
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
        projections: names of the q, k, v submodules (default: found from the model).
        student_heads, teacher_heads: head counts (default: ``model.config``); equal.
        student_scores, teacher_scores: paths of modules whose output holds the scores (both or
            neither); they replace the q/k capture.
        key_padding_mask: None (the batch's ``attention_mask``), False, or ``batch -> (B, L)`` bool.
        weight: multiplier of this loss in the total (default 1.0).

    Example::

        att = dx.method("tinybert_attn", student=["layers.0.attn", "layers.1.attn"],
                        teacher=["layers.1.attn", "layers.3.attn"], student_heads=12, teacher_heads=12)

        # in a run config
        {"name": "tinybert_attn", "student": ["layers.0.attn", "layers.1.attn"],
         "teacher": ["layers.1.attn", "layers.3.attn"], "student_heads": 12, "teacher_heads": 12}
    """

    name = "tinybert_attn"
    options = {"student_scores": None, "teacher_scores": None}
    uses = ("q", "k")

    def validate(self) -> None:
        scores = [_layers(self.student_scores), _layers(self.teacher_scores)]
        if (scores[0] is None) != (scores[1] is None) or [] in scores:
            raise ValueError(f"method {self.name!r}: give both student_scores and teacher_scores (module paths, "
                             "or lists of them), or neither to compute the scores from q/k")
        self._scores = scores[0] is not None
        if self._scores and len(scores[0]) != len(scores[1]):
            raise ValueError(f"method {self.name!r}: student_scores and teacher_scores must list the same number "
                             f"of layers, got {len(scores[0])} and {len(scores[1])}")
        super().validate()
        if self._scores:
            self._paths = {("student", "scores"): scores[0], ("teacher", "scores"): scores[1]}
            self._num_pairs = len(scores[0])
        self.check_bound()

    def bind(self, student, teacher) -> None:
        if not self._scores:
            super().bind(student, teacher)

    def check_bound(self) -> None:
        s, t = self._heads["student"], self._heads["teacher"]
        if None not in (s, t) and s != t:
            raise ValueError(f"method {self.name!r}: TinyBERT compares attention scores head by head, so the head "
                             f"counts must be equal: student_heads={s}, teacher_heads={t}")

    def used_projections(self) -> tuple[str, ...]:
        return ("scores",) if self._scores else self.uses

    def _scores_of(self, outputs: Mapping[str, Any], i: int, side: str) -> torch.Tensor:
        if self._scores:
            return self.require_feature(outputs, f"scores{i}", side, ndim=(4,),
                                        what="attention scores (B, heads, L, L)")
        q = self.per_head(self.tokens(outputs, f"q{i}", side), side, "q", f"q{i}")
        k = self.per_head(self.tokens(outputs, f"k{i}", side), side, "k", f"k{i}")
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
