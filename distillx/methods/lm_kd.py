"""Language-model distillation without (tokens × vocab) logits (``lm_kd``)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from .. import functional
from ..hf.output import output_layer
from .base import FeatureRequest, Method
from .kd import DIVERGENCES

IGNORE_INDEX = -100


class OutputLayerKD(Method):
    """Token-level distillation through both models' output layers (the base of ``lm_kd`` and
    ``gkd``): capture the hidden states at each output layer's input and compute
    :func:`distillx.functional.linear_kd_loss` on the kept positions (see :class:`LMKD`). A subclass
    says which divergence with :meth:`divergence_of`."""

    uses_logits = False
    options = {"T": 1.0, "shift": True, "ignore_index": IGNORE_INDEX, "student_head": None, "teacher_head": None,
               "chunk_size": None}

    def divergence_of(self) -> tuple[str, float]:
        """``(divergence, beta)`` for :func:`~distillx.functional.linear_kd_loss`."""
        raise NotImplementedError

    def validate(self) -> None:
        self.check_number("T", gt=0)
        self.check_bool("shift")
        self.check_int("ignore_index")
        self.check_int("chunk_size", ge=1, optional=True)
        for option in ("student_head", "teacher_head"):
            value = getattr(self, option)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"method {self.name!r}: option {option} must be None or a module path, got {value!r}")
        # {side: (path, module)}: plain dict, so the models' layers are not registered as submodules
        self._heads: dict[str, tuple[str, Any]] = {}

    def bind(self, student, teacher) -> None:
        heads = {side: output_layer(model, getattr(self, f"{side}_head"), side)
                 for side, model in (("student", student), ("teacher", teacher))}
        (sp, sm), (tp, tm) = heads["student"], heads["teacher"]
        if sm.weight.shape[0] != tm.weight.shape[0]:
            raise ValueError(f"method {self.name!r}: the student's output layer {sp!r} has a vocabulary of "
                             f"{sm.weight.shape[0]} but the teacher's {tp!r} has {tm.weight.shape[0]}; lm_kd compares "
                             "next-token distributions over one vocabulary (same tokenizer), so they must agree")
        self._heads = heads

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
        sm, tm = self._heads["student"][1], self._heads["teacher"][1]
        divergence, beta = self.divergence_of()
        return functional.linear_kd_loss(hs, sm.weight, ht, tm.weight, getattr(sm, "bias", None),
                                         getattr(tm, "bias", None), temperature=self.T, divergence=divergence,
                                         beta=beta, reduction="batchmean", mask=keep, chunk_size=self.chunk_size)


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
    ``nn.Linear``, or ``student_head``/``teacher_head``. Both must have the same vocabulary.

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


__all__ = ["LMKD", "OutputLayerKD"]
