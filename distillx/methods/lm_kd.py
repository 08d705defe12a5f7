"""Language-model distillation without (tokens × vocab) logits (``lm_kd``)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from .. import functional
from .._batch import batch_inputs
from ..hf.output import output_layer
from .base import FeatureRequest, Method
from .kd import DIVERGENCES

IGNORE_INDEX = -100
MAX_PADDING = 1024  # rows: more than any padding convention adds (Megatron: 128 x tensor-parallel ranks)


def shared_rows(student_rows: int, teacher_rows: int) -> Optional[int]:
    """The rows two output layers share when their sizes can be one vocabulary padded twice (the
    rule of :class:`LMKD`'s docstring), else None."""
    small, large = sorted((int(student_rows), int(teacher_rows)))
    step = large & -large  # the largest power of two dividing the larger size
    return small if large - small < step and large - small <= MAX_PADDING else None


class OutputLayerKD(Method):
    """Token-level distillation through both models' output layers (the base of ``lm_kd`` and
    ``gkd``): capture the hidden states at each output layer's input and compute
    :func:`distillx.functional.linear_kd_loss` over the rows both layers share, on the kept
    positions (see :class:`LMKD`, whose docstring states the position and vocabulary rules). A
    subclass says which divergence with :meth:`divergence_of`."""

    uses_logits = False
    options = {"T": 1.0, "shift": True, "ignore_index": IGNORE_INDEX, "student_head": None, "teacher_head": None,
               "chunk_size": None, "vocab_size": None}

    def divergence_of(self) -> tuple[str, float]:
        """``(divergence, beta)`` for :func:`~distillx.functional.linear_kd_loss`."""
        raise NotImplementedError

    def validate(self) -> None:
        self.check_number("T", gt=0)
        self.check_bool("shift")
        self.check_int("ignore_index")
        self.check_int("chunk_size", ge=1, optional=True)
        self.check_int("vocab_size", ge=1, optional=True)
        for option in ("student_head", "teacher_head"):
            value = getattr(self, option)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"method {self.name!r}: option {option} must be None or a module path, got {value!r}")
        # {side: (path, module)}: plain dict, so the models' layers are not registered as submodules
        self._heads: dict[str, tuple[str, Any]] = {}
        self._rows: dict[str, int] = {}  # {side: the output layer's row count}
        self._vocab: Optional[int] = None  # the shared rows (the class docstring's rule)

    def bind(self, student, teacher) -> None:
        heads = {side: output_layer(model, getattr(self, f"{side}_head"), side)
                 for side, model in (("student", student), ("teacher", teacher))}
        rows = {side: int(module.weight.shape[0]) for side, (_, module) in heads.items()}
        self._vocab = self._shared_vocab(heads, rows)
        self._heads, self._rows = heads, rows

    def _shared_vocab(self, heads: dict, rows: dict) -> int:
        """:math:`V` by the class docstring's rule, or a ``ValueError`` naming both layers and sizes."""
        sizes = (f"the student's output layer {heads['student'][0]!r} has {rows['student']} rows and the teacher's "
                 f"{heads['teacher'][0]!r} has {rows['teacher']}")
        if self.vocab_size is not None:
            if self.vocab_size > min(rows.values()):
                raise ValueError(f"method {self.name!r}: option vocab_size={self.vocab_size} is more rows than both "
                                 f"output layers have: {sizes}")
            return self.vocab_size
        shared = shared_rows(rows["student"], rows["teacher"])
        if shared is None:
            raise ValueError(f"method {self.name!r}: {sizes}; {self.name} compares next-token distributions over "
                             "one tokenizer's vocabulary, and these sizes are not one vocabulary padded to two sizes "
                             f"(they differ by {abs(rows['student'] - rows['teacher'])} rows, more than the padding "
                             "of the larger size allows): the models have different tokenizers. If they share one, "
                             "set vocab_size=len(tokenizer)")
        return shared

    @property
    def shared_vocab(self) -> int:
        """:math:`V`, the output rows both models' distributions are compared over (after :meth:`bind`)."""
        if self._vocab is None:
            raise RuntimeError(f"method {self.name!r}: shared_vocab is known once the method is bound to the models "
                               "(method.bind(student, teacher); the Distiller does it)")
        return self._vocab

    def output_weights(self) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
        """``(student weight, student bias, teacher weight, teacher bias)``: the first
        :attr:`shared_vocab` rows of each output layer, views (gradients reach the layers)."""
        V, out = self.shared_vocab, []
        for side in ("student", "teacher"):
            module = self._heads[side][1]
            weight, bias = module.weight, getattr(module, "bias", None)
            if self._rows[side] != V:  # all rows: the parameters themselves (a sharded one may not slice)
                weight, bias = weight[:V], None if bias is None else bias[:V]
            out += [weight, bias]
        return tuple(out)

    def check_token_ids(self, batch: Any) -> None:
        """A ``ValueError`` naming a token id of the batch at or above :attr:`shared_vocab`; checked
        only when an output layer has rows beyond it (else every row is compared)."""
        V = self.shared_vocab
        if V >= max(self._rows.values()):
            return
        inputs = batch_inputs(batch)
        found = [(k, inputs[k]) for k in ("input_ids", "prompt_input_ids")
                 if isinstance(inputs, Mapping) and isinstance(inputs.get(k), torch.Tensor)]
        targets = batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 2 else None
        if isinstance(targets, torch.Tensor):
            found.append(("labels", targets))
        found = [(k, t) for k, t in found if t.numel() and not t.is_floating_point()]
        if not found:
            return
        tops = torch.stack([t.max() for _, t in found]).tolist()  # one host sync for all
        for (key, _), top in zip(found, tops):
            if top >= V:
                raise ValueError(f"method {self.name!r}: the batch's {key} holds token id {top}, but the output layers "
                                 f"share only the first {V} rows (student {self._rows['student']}, teacher "
                                 f"{self._rows['teacher']}): the ids come from another tokenizer, or vocab_size is "
                                 "too small")

    def _path(self, side: str) -> str:
        if side in self._heads:
            return self._heads[side][0]
        given = getattr(self, f"{side}_head")
        if given is None:
            raise ValueError(f"method {self.name!r}: the {side}'s output layer is found in the model: the Distiller "
                             "does it when it starts; used on its own, call method.bind(student, teacher)")
        return given

    def features(self) -> list[FeatureRequest]:
        return [FeatureRequest("hidden", f"{self._path('student')}@input", f"{self._path('teacher')}@input")]

    def output_layers(self) -> dict[str, str]:
        return {side: path for side, (path, _) in self._heads.items()}

    def keep(self, batch: Any, shape: tuple[int, ...], device=None) -> Optional[torch.Tensor]:
        """The (B, L) bool mask of positions that count (see the class docstring), or None for all."""
        if len(shape) != 2:
            return None
        B, L = shape
        mask = self.attention_mask(batch, (B, L), "hidden")
        targets = batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 2 else None
        labels = targets if (isinstance(targets, torch.Tensor) and not targets.is_floating_point()
                             and tuple(targets.shape) == (B, L)) else None
        if not self.shift:
            keep = None if mask is None else mask.clone()
            if labels is not None:
                keep = (labels != self.ignore_index) if keep is None else keep & (labels != self.ignore_index)
            return keep
        keep = torch.ones(B, L, dtype=torch.bool, device=device)
        keep[:, -1] = False
        if mask is not None:
            keep[:, :-1] &= mask[:, :-1] & mask[:, 1:]
        if labels is not None:
            keep[:, :-1] &= labels[:, 1:] != self.ignore_index
        return keep

    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None) -> torch.Tensor:
        if set(self._heads) != {"student", "teacher"}:
            raise RuntimeError(f"method {self.name!r}: call method.bind(student, teacher) first (the Distiller does): "
                               "the loss needs both output layers' weights")
        hs = self.require_feature(student, "hidden", "student", ndim=(2, 3),
                                  what="hidden states (B, L, H) at the output layer's input")
        ht = self.require_feature(teacher, "hidden", "teacher", ndim=(hs.dim(),),
                                  what=f"hidden states of the student's rank (student {tuple(hs.shape)})")
        if hs.shape[:-1] != ht.shape[:-1]:
            raise self.feature_error("hidden", f"student {tuple(hs.shape)} and teacher {tuple(ht.shape)} hidden states "
                                               "must agree in batch and sequence length")
        keep = self.keep(batch, tuple(hs.shape[:-1]), hs.device)
        self.check_token_ids(batch)
        ws, bs, wt, bt = self.output_weights()
        divergence, beta = self.divergence_of()
        return functional.linear_kd_loss(hs, ws, ht, wt, bs, bt, temperature=self.T, divergence=divergence, beta=beta,
                                         reduction="batchmean", mask=keep, chunk_size=self.chunk_size)


class LMKD(OutputLayerKD):
    r"""Token-level logit distillation of a causal language model through the output layers, never
    materialising the (tokens × vocab) logits of either model.

    The method captures each model's final hidden states (the *input* of its output layer, the
    ``lm_head``) and computes :func:`distillx.functional.linear_kd_loss` with both output layers'
    weights (tied embeddings included): per kept position :math:`t`, with
    :math:`p = \mathrm{softmax}(W_t h^t_t / T)` and :math:`q = \mathrm{softmax}(W_s h^s_t / T)`,
    :math:`T^2\,D(p, q)` for ``divergence`` ``"kl"`` (forward KL), ``"reverse_kl"`` or ``"jsd"``
    (β), averaged over the kept positions. When no other term reads logits, neither model's output
    layer runs at all: the step stops each model at its output layer's input, so peak memory does
    not grow with the vocabulary beyond the output layers themselves.

    Kept positions (``shift=True``, a causal LM): position :math:`t` predicts token :math:`t+1`, so
    the last position is dropped, and so is every :math:`t` whose next token is padding
    (``attention_mask``) or, when the batch carries ``labels`` (B, L), whose next label is
    ``ignore_index`` (prompt tokens in instruction tuning, padding); a padding position itself is
    dropped too. ``shift=False`` (a masked LM) keeps :math:`t` by its own mask and label.

    The output layers are ``model.get_output_embeddings()`` (transformers) or the last
    ``nn.Linear``, or ``student_head``/``teacher_head``. Both read one tokenizer's vocabulary; their
    row counts may differ by padding (Qwen2.5-3B has 151,936 rows, Qwen2.5-72B 152,064, for one
    tokenizer of 151,665 tokens). The distributions are then compared over the rows both have,
    :math:`V` = :attr:`shared_vocab`: each model's softmax over its output layer's first :math:`V`
    rows (views of the weight and bias, so the student's gradient reaches its own output layer).
    The rule, applied when the methods are bound to the models:

    - ``vocab_size`` given (``len(tokenizer)`` is the exact choice): :math:`V` = ``vocab_size``, at
      most both row counts;
    - equal row counts: all rows;
    - else padding: a model pads its output layer by rounding the tokenizer's length :math:`N` up to
      a multiple of a power of two, so with :math:`N` ≤ the smaller size :math:`S`, the larger size
      :math:`L` exceeds :math:`S` by less than the largest power of two dividing :math:`L`. Sizes
      that meet this, with :math:`L - S` ≤ 1024 rows, share :math:`V = S` rows (151,936 and
      152,064: 128 < 512; GPT-2's 50,257 and 50,304: 47 < 128); others are different tokenizers
      and a ``ValueError`` names both sizes (set ``vocab_size`` if they truly share one).

    When :math:`V` is less than a row count, each batch's token ids (``input_ids``,
    ``prompt_input_ids``, the labels) are checked to be below :math:`V` (one reduction per step): a
    larger id is a ``ValueError`` naming it and :math:`V`. Subclasses (``gkd``) inherit the rule;
    generation should sample only the first :attr:`shared_vocab` rows of the student's logits.

    Papers: G. Hinton, O. Vinyals, J. Dean, arXiv:1503.02531 (token-level KD of a language model);
    reverse KL: Y. Gu, L. Dong, F. Wei, M. Huang, "MiniLLM", ICLR 2024; generalised JSD:
    R. Agarwal et al., "On-Policy Distillation of Language Models" (GKD), ICLR 2024.

    Options:
        T: temperature, > 0 (default 1.0).
        divergence: ``"kl"``, ``"reverse_kl"`` or ``"jsd"`` (default ``"kl"``).
        beta: JSD mixing weight, strictly between 0 and 1 (default 0.5).
        shift: next-token alignment of a causal LM (default True).
        ignore_index: label value of positions left out (default -100).
        student_head, teacher_head: paths of the output layers (default: found).
        chunk_size: rows per chunk of the fused kernel (default: about 8M logits per chunk).
        vocab_size: the output rows compared, e.g. ``len(tokenizer)`` (default: the rule above).
        weight: multiplier of this loss in the total (default 1.0).

    Example::

        d = dx.Distiller(teacher_lm, student_lm, [dx.method("lm_kd", T=1.0, divergence="reverse_kl")],
                         task_weight=0.0)

        # in a run config
        {"name": "lm_kd", "T": 1.0, "divergence": "jsd", "beta": 0.5}
    """

    name = "lm_kd"
    options = {"divergence": "kl", "beta": 0.5}

    def validate(self) -> None:
        super().validate()
        self.check_choice("divergence", DIVERGENCES)
        self.check_number("beta", gt=0, lt=1)

    def divergence_of(self) -> tuple[str, float]:
        return self.divergence, self.beta


__all__ = ["LMKD", "OutputLayerKD", "shared_rows", "MAX_PADDING"]
