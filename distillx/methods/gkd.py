r"""On-policy distillation of causal LMs (``gkd``): the student learns on its own samples."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..hf.generate import end_of_sequence, join, sample
from .base import BatchContext
from .lm_kd import OutputLayerKD

PROMPT_KEYS = ("prompt_input_ids", "prompt_attention_mask")


class GKD(OutputLayerKD):
    r"""Generalised knowledge distillation (GKD): with probability ``lmbda`` per batch the
    completion is replaced by the student's own sample, and the student minimises the generalised
    Jensen-Shannon divergence to the teacher on the completion tokens, through both output layers,
    never materialising (tokens × vocab) logits.

    Per training batch (a :func:`distillx.hf.text.chat_loader` batch: ``input_ids``,
    ``attention_mask``, ``labels`` with -100 on the prompt and padding, and the left-padded prompt
    alone as ``prompt_input_ids``/``prompt_attention_mask``):

    1. draw :math:`u \sim U[0, 1)` from the run's generator (saved in checkpoints, one per process);
    2. if :math:`u < \lambda` (*on-policy*): sample a completion from the student
       (:func:`distillx.hf.generate.sample`: KV cache, ``eval()``, no grad, ``max_new_tokens``,
       ``temperature``, ``top_p``, stopping at the end-of-sequence token; positions after it are
       padding); else with ``seq_kd=True`` from the teacher (sequence-level KD); else keep the
       dataset's completion;
    3. both models run on prompt + completion, and per completion position :math:`t` (it predicts
       token :math:`t+1`), with :math:`p = \mathrm{softmax}(z^t_t/T)` (teacher) and
       :math:`q = \mathrm{softmax}(z^s_t/T)` (student):

       .. math:: T^2\,\mathrm{JSD}_\beta(p, q) = T^2\big(\beta\,\mathrm{KL}(p\,\|\,m) +
                 (1-\beta)\,\mathrm{KL}(q\,\|\,m)\big),\qquad m = \beta p + (1-\beta) q,

       averaged over the completion tokens. :math:`\beta = 0` is taken as the forward KL
       :math:`\mathrm{KL}(p\|q)` and :math:`\beta = 1` as the reverse KL :math:`\mathrm{KL}(q\|p)`
       (the limits of the scaled divergence), as in the paper and TRL.

    **β convention and TRL**: this β is TRL ``GKDTrainer``'s ``beta`` (``generalized_jsd_loss``: the
    mixture ``beta·teacher + (1-beta)·student``, 0 forward KL, 1 reverse KL), and ``lmbda`` its
    ``lmbda``. Two differences: the loss here is multiplied by :math:`T^2` (Hinton's scaling, as
    every distillx logit loss; TRL's is not), and TRL divides the logits by its generation
    ``temperature`` while ``T`` here is separate from the sampling ``temperature``.
    ``lmbda=0, seq_kd=False`` is exactly ``lm_kd(divergence="jsd", beta=β)`` on the dataset's
    completion.

    Sampling is restricted to the vocabulary rows both output layers share (``lm_kd``'s rule for
    output layers padded to different sizes: :attr:`shared_vocab`). A sampled batch holds
    ``input_ids``, ``attention_mask`` and ``labels`` (other keys of the batch are dropped). The
    teacher scores every sampled token, so a teacher cache cannot be used; ``strategy="fsdp"`` is
    refused (each process stops generating at its own step, which the sharded student's collectives
    cannot follow); under DDP every process samples its own batches from its own generator.

    Logged per step (``gkd/<name>``; per epoch their means): ``on_policy`` (1 when the batch was the
    student's sample), ``sampled_tokens`` and ``sampled_divergence`` (the mean sampled length and
    the divergence of on-policy batches, 0 otherwise); per epoch also ``mean_sampled_length`` and
    ``divergence_on_samples``: their means over the on-policy batches only (the teacher-scored
    per-token divergence on the student's own samples).

    Paper: R. Agarwal, N. Vieillard, Y. Zhou, P. Stanczyk, S. Ramos, M. Geist, O. Bachem,
    "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR 2024.

    Options:
        lmbda: probability of an on-policy batch, in [0, 1] (default 0.5).
        beta: JSD mixing weight in [0, 1] (default 0.5).
        T: temperature of the divergence, > 0 (default 1.0).
        max_new_tokens: longest sampled completion (default 128).
        temperature: sampling temperature, >= 0; 0 is greedy (default 1.0).
        top_p: nucleus sampling mass, in (0, 1] (default 1.0: the whole distribution).
        seq_kd: off-policy batches use the teacher's samples instead of the dataset's (default False).
        eos_token_id: end-of-sequence id(s) (default: the student's ``generation_config``/``config``).
        pad_token_id: the id written after a sample's end (masked; default the student config's, else 0).
        shift, ignore_index, student_head, teacher_head, chunk_size, vocab_size, weight: as in ``lm_kd``
            (vocabularies padded to different sizes are compared over their shared rows).

    Example::

        train = dx.hf.text.chat_loader("chat.jsonl", tokenizer, max_length=256, batch_size=8)
        d = dx.Distiller(teacher_lm, student_lm, [dx.method("gkd", lmbda=0.5, beta=0.5)], task_weight=0.0)
        d.fit(train, 1)
    """

    name = "gkd"
    rewrites_batch = True
    metric_names = ("on_policy", "sampled_tokens", "sampled_divergence")
    options = {"lmbda": 0.5, "beta": 0.5, "max_new_tokens": 128, "temperature": 1.0, "top_p": 1.0, "seq_kd": False,
               "eos_token_id": None, "pad_token_id": None}

    def validate(self) -> None:
        super().validate()
        self.check_number("lmbda", ge=0, le=1)
        self.check_number("beta", ge=0, le=1)
        self.check_int("max_new_tokens", ge=1)
        self.check_number("temperature", ge=0)
        self.check_number("top_p", gt=0, le=1)
        self.check_bool("seq_kd")
        self.check_int("pad_token_id", ge=0, optional=True)
        eos = self.eos_token_id
        if eos is not None and not (isinstance(eos, int) and not isinstance(eos, bool) and eos >= 0) and not (
                isinstance(eos, (list, tuple)) and eos and all(isinstance(e, int) and not isinstance(e, bool)
                                                               and e >= 0 for e in eos)):
            raise ValueError(f"method {self.name!r}: option eos_token_id must be None, an int >= 0 or a non-empty list "
                             f"of them, got {eos!r}")
        self._on_policy, self._sampled, self._last = 0.0, 0.0, None

    def divergence_of(self) -> tuple[str, float]:
        if self.beta == 0:
            return "kl", 0.5
        if self.beta == 1:
            return "reverse_kl", 0.5
        return "jsd", float(self.beta)

    # -- the batch -------------------------------------------------------------------------------
    def prepare_batch(self, inputs: Any, targets: Any, context: BatchContext) -> tuple[Any, Any]:
        if not isinstance(inputs, Mapping) or not all(k in inputs for k in PROMPT_KEYS):
            have = sorted(map(str, inputs)) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ValueError(f"method {self.name!r} samples completions from the prompts, so its batches need "
                             f"{' and '.join(PROMPT_KEYS)} (the prompt alone, left-padded: "
                             f"distillx.hf.text.chat_loader or [data.chat] make them); this batch holds {have}")
        on_policy = bool(torch.rand((), generator=context.generator) < self.lmbda)
        self._on_policy, self._sampled, self._last = float(on_policy), 0.0, None
        rest = {k: v for k, v in inputs.items() if k not in PROMPT_KEYS}
        if not on_policy and not self.seq_kd:
            return rest, targets
        model = context.student if on_policy else context.teacher
        prompt_ids, prompt_mask = inputs[PROMPT_KEYS[0]], inputs[PROMPT_KEYS[1]]
        pad = self._pad_id(context.student)
        eos = self.eos_token_id if self.eos_token_id is not None else end_of_sequence(context.student) or None
        tokens, lengths = sample(model, prompt_ids, prompt_mask, max_new_tokens=self.max_new_tokens,
                                 generator=context.generator, temperature=self.temperature, top_p=self.top_p,
                                 eos_token_id=eos, pad_token_id=pad, vocab_size=self.shared_vocab)
        if on_policy:
            self._sampled = float(lengths.double().mean())
        batch = join(prompt_ids, prompt_mask, tokens, lengths, pad, self.ignore_index)
        labels = batch.pop("labels")
        return batch, labels

    def _pad_id(self, student) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        pad = getattr(getattr(student, "config", None), "pad_token_id", None)
        return int(pad) if isinstance(pad, int) and pad >= 0 else 0

    # -- what it logs ------------------------------------------------------------------------------
    def loss(self, student: Mapping[str, Any], teacher: Mapping[str, Any], batch: Any = None) -> torch.Tensor:
        value = super().loss(student, teacher, batch)
        self._last = value.detach()
        return value

    def batch_metrics(self) -> dict[str, Any]:
        divergence = self._last if self._last is not None else 0.0
        return {"on_policy": self._on_policy, "sampled_tokens": self._sampled,
                "sampled_divergence": divergence * self._on_policy}

    def epoch_metrics(self, means: Mapping[str, float]) -> dict[str, float]:
        share = means.get("on_policy", 0.0)
        if share <= 0:
            return {"mean_sampled_length": 0.0, "divergence_on_samples": 0.0}
        return {"mean_sampled_length": means["sampled_tokens"] / share,
                "divergence_on_samples": means["sampled_divergence"] / share}


__all__ = ["GKD"]
