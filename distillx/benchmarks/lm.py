"""The ``lm_kd`` benchmark case: distilling a LLaMA-style causal LM pair, one forward+backward of a
whole training step's loss, with

- *eager*: both models compute their full (tokens × vocab) logits, then the logit divergence of the
  ``kd`` method on them (the pure-PyTorch reference), next-token positions masked as ``lm_kd`` does;
- *compile*: ``torch.compile`` of that same function;
- *distillx*: :class:`distillx.Distiller` with ``dx.method("lm_kd")``: neither output layer runs, the
  fused ``linear_kd_loss`` reads both from the final hidden states.

The models are built by :func:`build` from ``transformers.LlamaConfig`` (grouped-query attention,
random weights, seeded); gradients are checked on the student's output layer and embeddings.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..distiller import Distiller
from ..ops.reference import kd_loss_reference
from ..plugin import method

_DISTILLERS: Dict[tuple, object] = {}


def _llama(hidden: int, vocab: int, heads: int, dtype: torch.dtype, device: torch.device, eos_token_id=2):
    import transformers  # noqa: PLC0415 - optional dependency, only for this case

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                                      intermediate_size=2 * hidden, max_position_embeddings=4096,
                                      bos_token_id=1, eos_token_id=eos_token_id, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = eos_token_id
    return model


def llama_pair(sizes, dtype, device, gen, eos_token_id=2):
    """``(teacher, student)``: 2-layer LLaMA-style models of widths ``Ht`` and ``Hs`` over ``C``
    tokens, random weights from a seed drawn from ``gen`` (the global generator is left as it was)."""
    C, Hs, Ht = sizes["C"], sizes["Hs"], sizes["Ht"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=gen.device).item()))
        teacher = _llama(Ht, C, max(2, Ht // 32), dtype, device, eos_token_id)
        student = _llama(Hs, C, max(2, Hs // 32), dtype, device, eos_token_id)
    return teacher, student


def build(sizes, dtype, device, gen) -> tuple[dict, dict]:
    """``(args, kwargs)`` of the case: token ids and mask (the last eighth of every other row is
    padding), the two models, and the student's output layer and embeddings as the checked
    gradient leaves."""
    B, L, C = sizes["B"], sizes["L"], sizes["C"]
    teacher, student = llama_pair(sizes, dtype, device, gen)
    ids = torch.randint(3, C, (B, L), generator=gen, device=gen.device).to(device)
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    mask[1::2, L - max(1, L // 8):] = 0
    return {"input_ids": ids}, {"attention_mask": mask, "student": student, "teacher": teacher,
                                "student_head": student.lm_head.weight,
                                "student_embed": student.model.embed_tokens.weight}


def next_token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is real (what ``lm_kd`` keeps with ``shift=True`` and no labels)."""
    keep = torch.zeros_like(attention_mask, dtype=torch.bool)
    real = attention_mask != 0
    keep[:, :-1] = real[:, :-1] & real[:, 1:]
    return keep


def kd_full_logits(input_ids, attention_mask, *, student, teacher, student_head=None, student_embed=None,
                   temperature=1.0, divergence="kl"):
    """Both models' full logits, then the KD divergence on the kept next-token positions."""
    with torch.no_grad():
        t = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    s = student(input_ids=input_ids, attention_mask=attention_mask).logits
    return kd_loss_reference(s, t, temperature, divergence, 0.5, "batchmean", next_token_mask(attention_mask))


def lm_kd_step(input_ids, attention_mask, *, student, teacher, student_head=None, student_embed=None,
               temperature=1.0, divergence="kl"):
    """The same loss as a Distiller step with ``lm_kd`` computes it (output layers skipped)."""
    key = (id(student), id(teacher), float(temperature), divergence)
    d = _DISTILLERS.get(key)
    if d is None:
        d = _DISTILLERS[key] = Distiller(teacher, student, [method("lm_kd", T=temperature, divergence=divergence)],
                                         task_weight=0.0, progress=False)
    return d.losses({"input_ids": input_ids, "attention_mask": attention_mask})["loss"]


__all__ = ["build", "kd_full_logits", "llama_pair", "lm_kd_step", "next_token_mask"]
