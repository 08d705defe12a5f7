r"""Sampling a completion from a causal LM for on-policy distillation, from a generator the caller owns.

:func:`sample` continues each left-padded prompt by up to ``max_new_tokens`` tokens, one position at
a time, under ``no_grad`` with the model in ``eval()`` (its mode restored after). A model whose
``forward`` takes ``use_cache`` and ``past_key_values`` (transformers 4) or ``cache`` (transformers
5), every transformers causal LM, runs with its KV cache: the prompt once, then one token per step;
``position_ids`` follow the attention mask, so left padding does not shift positions. Only the last position's logits are computed when the model
takes ``logits_to_keep`` (or the older ``num_logits_to_keep``): a step holds (batch × vocab) logits,
never (tokens × vocab). Any other model is called on the whole sequence each step.

Each token is drawn by inverse transform sampling: with :math:`\pi = \mathrm{softmax}(z/\tau)`
(restricted to the smallest set of most likely tokens whose mass reaches ``top_p``, nucleus sampling:
A. Holtzman et al., ICLR 2020), the token is the first index whose cumulative mass exceeds
:math:`u\sum\pi`, :math:`u \sim U[0, 1)` drawn from ``generator``, a CPU ``torch.Generator``: the
draws depend only on its state, on any device, so a checkpoint of the generator makes a resumed run
draw the same tokens. ``temperature=0`` takes the most likely token (greedy). A row stops after its
first end-of-sequence token; the positions after it hold ``pad_token_id`` and do not count in its
length.
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .. import _checks

TokenIds = Union[int, Sequence[int], None]
CACHE_KEYS = ("past_key_values", "cache")


def end_of_sequence(model: nn.Module, given: TokenIds = None) -> list[int]:
    """The end-of-sequence ids: ``given``, else the model's ``generation_config`` or ``config``
    ``eos_token_id`` (an int or a list), else none."""
    value = given
    for source in ("generation_config", "config"):
        if value is None:
            value = getattr(getattr(model, source, None), "eos_token_id", None)
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits`` (B, V) (see the module docstring)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64).to(probs.device)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
        sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
        cdf = sorted_p.double().cumsum(-1)
        index = (cdf < u * cdf[:, -1:]).sum(-1, keepdim=True).clamp(max=probs.shape[-1] - 1)
        return order.gather(-1, index).squeeze(-1)
    cdf = probs.double().cumsum(-1)
    return (cdf < u * cdf[:, -1:]).sum(-1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
           generator: torch.Generator, temperature: float = 1.0, top_p: float = 1.0, eos_token_id: TokenIds = None,
           pad_token_id: int = 0, vocab_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, lengths)``: (B, max_new_tokens) sampled token ids after each left-padded prompt
    (``prompt_ids``, ``prompt_mask``: (B, P)), ``pad_token_id`` after a row's end, and (B,) the
    number of tokens each row generated, its end-of-sequence token included. ``vocab_size``: draw
    only from the first rows of the output layer (the vocabulary two models share)."""
    _checks.integer("max_new_tokens", max_new_tokens, ge=1)
    _checks.number("temperature", temperature, ge=0)
    _checks.number("top_p", top_p, gt=0, le=1)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"generator must be a CPU torch.Generator, got {generator!r}")
    if prompt_ids.dim() != 2 or prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_ids and prompt_mask must be (batch, length) of one shape, got "
                         f"{tuple(prompt_ids.shape)} and {tuple(prompt_mask.shape)}")
    if prompt_ids.shape[1] == 0 or not bool(prompt_mask.bool().any(-1).all()):
        raise ValueError("every prompt needs at least one token to continue from (prompt_attention_mask has a row "
                         "of zeros)")
    eos = torch.tensor(end_of_sequence(model, eos_token_id), dtype=torch.long, device=prompt_ids.device)
    accepts = set(inspect.signature(model.forward).parameters)
    # transformers 5 names the KV cache argument (and output) "cache"; 4.x "past_key_values"
    cache_key = next((k for k in CACHE_KEYS if k in accepts), None) if "use_cache" in accepts else None
    keep = next(({k: 1} for k in ("logits_to_keep", "num_logits_to_keep") if k in accepts), {})
    positions = "position_ids" in accepts
    B = prompt_ids.shape[0]
    mask = prompt_mask.to(torch.long)
    ids = prompt_ids
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=prompt_ids.device)
    lengths = torch.zeros(B, dtype=torch.long, device=prompt_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    past, step_ids = None, ids
    training = model.training
    model.eval()
    try:
        for t in range(max_new_tokens):
            kwargs = {"attention_mask": mask}
            if positions:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            if cache_key is not None:
                out = model(input_ids=step_ids, use_cache=True, **{cache_key: past}, **kwargs, **keep)
                past = out[cache_key]
            else:
                out = model(input_ids=ids, **kwargs, **keep)
            logits = out if isinstance(out, torch.Tensor) else out["logits"] if isinstance(out, dict) else out.logits
            logits = logits[:, -1, :vocab_size] if vocab_size is not None else logits[:, -1]
            nxt = _draw(logits, temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            tokens[:, t] = nxt
            lengths += (~done).long()
            if eos.numel():
                done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            if cache_key is None:  # only a model without a cache is fed the whole sequence
                ids = torch.cat([ids, step_ids], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    finally:
        model.train(training)
    return tokens, lengths


def join(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
         pad_token_id: int = 0, ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """Right-padded ``{"input_ids", "attention_mask", "labels"}`` of each prompt (its tokens without
    the left padding) followed by its first ``lengths`` sampled ``tokens``; ``labels`` hold the
    sampled tokens and ``ignore_index`` on the prompt and the padding (the layout of
    :func:`distillx.hf.text.chat_loader`'s batches)."""
    B = prompt_ids.shape[0]
    prompt_lengths = prompt_mask.to(torch.long).sum(-1)
    total = prompt_lengths + lengths
    width = max(1, int(total.max()))
    device = prompt_ids.device
    input_ids = torch.full((B, width), pad_token_id, dtype=torch.long, device=device)
    labels = torch.full((B, width), ignore_index, dtype=torch.long, device=device)
    column = torch.arange(width, device=device)[None]
    attention = (column < total[:, None]).to(torch.long)
    for b in range(B):
        p, n = int(prompt_lengths[b]), int(lengths[b])
        prompt = prompt_ids[b][prompt_mask[b].bool()]
        input_ids[b, :p] = prompt
        input_ids[b, p:p + n] = tokens[b, :n]
        labels[b, p:p + n] = tokens[b, :n]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


__all__ = ["end_of_sequence", "join", "sample"]
