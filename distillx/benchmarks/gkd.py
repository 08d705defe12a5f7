"""The ``gkd`` benchmark cases: one whole on-policy distillation step of a LLaMA-style pair, from
the prompts to the student's gradients: the student samples a completion of ``G`` tokens after each
prompt of ``P`` tokens (greedy, so every implementation scores the same tokens), the teacher scores
it, the generalised JSD (β = 0.5) on the completion tokens, forward and backward:

- *eager*: sampling with transformers' ``generate``, then both models' full (tokens × vocab)
  logits and the divergence on them (the pure-PyTorch reference), as TRL's ``GKDTrainer`` does;
- *compile*: the same, the scoring and the loss under ``torch.compile`` (``generate`` runs eagerly);
- *distillx*: a :class:`distillx.Distiller` step with ``dx.method("gkd", lmbda=1)``: sampling
  with the KV cache on the last position's logits only, neither output layer run in the scoring,
  the fused ``linear_kd_loss``.

Both models never emit their end-of-sequence token here (none is configured), so every step samples
``G`` tokens: the work is the same in every implementation and every repeat.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..distiller import Distiller
from ..hf.generate import join
from ..ops.reference import kd_loss_reference
from ..plugin import method
from .lm import llama_pair

_DISTILLERS: Dict[tuple, object] = {}
BETA = 0.5


def build(sizes, dtype, device, gen) -> tuple[dict, dict]:
    """``(args, kwargs)``: left-padded prompts (every other row a quarter shorter), the two models,
    the number of tokens to sample, and the student's output layer and embeddings as the checked
    gradient leaves."""
    B, P, C = sizes["B"], sizes["P"], sizes["C"]
    teacher, student = llama_pair(sizes, dtype, device, gen, eos_token_id=None)
    ids = torch.randint(3, C, (B, P), generator=gen, device=gen.device).to(device)
    mask = torch.ones(B, P, dtype=torch.long, device=device)
    mask[1::2, :max(1, P // 4)] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"prompt_input_ids": ids}, {"prompt_attention_mask": mask, "student": student, "teacher": teacher,
                                       "new_tokens": sizes["G"], "student_head": student.lm_head.weight,
                                       "student_embed": student.model.embed_tokens.weight}


@torch.compiler.disable
def _sample_and_join(student, prompt_input_ids, prompt_attention_mask, new_tokens):
    out = student.generate(input_ids=prompt_input_ids, attention_mask=prompt_attention_mask, do_sample=False,
                           max_new_tokens=new_tokens, pad_token_id=0)
    tokens = out[:, prompt_input_ids.shape[1]:]
    lengths = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=tokens.device)
    return join(prompt_input_ids, prompt_attention_mask, tokens, lengths)


def gkd_full_logits(prompt_input_ids, prompt_attention_mask, *, student, teacher, new_tokens, student_head=None,
                    student_embed=None, temperature=1.0):
    """Sample, then both models' full logits and JSD(β) on the completion's next-token positions."""
    batch = _sample_and_join(student, prompt_input_ids, prompt_attention_mask, new_tokens)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        t = teacher(**inputs).logits
    s = student(**inputs).logits
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = batch["labels"][:, 1:] != -100
    return kd_loss_reference(s, t, temperature, "jsd", BETA, "batchmean", keep)


def gkd_step(prompt_input_ids, prompt_attention_mask, *, student, teacher, new_tokens, student_head=None,
             student_embed=None, temperature=1.0):
    """The same step as a Distiller with ``gkd`` (lmbda=1, greedy) computes it."""
    key = (id(student), id(teacher), float(temperature), int(new_tokens))
    d = _DISTILLERS.get(key)
    if d is None:
        d = _DISTILLERS[key] = Distiller(
            teacher, student, [method("gkd", lmbda=1.0, beta=BETA, T=temperature, temperature=0.0,
                                      max_new_tokens=new_tokens)], task_weight=0.0, progress=False)
    labels = torch.full_like(prompt_input_ids, -100)
    return d.losses({"input_ids": prompt_input_ids, "attention_mask": prompt_attention_mask, "labels": labels,
                     "prompt_input_ids": prompt_input_ids, "prompt_attention_mask": prompt_attention_mask})["loss"]


__all__ = ["build", "gkd_full_logits", "gkd_step"]
