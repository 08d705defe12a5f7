"""Prompt/completion batches in the layout of :func:`distillx.hf.text.chat_loader`, built from random
token ids (no tokenizer): ``input_ids``/``attention_mask``/``labels`` right-padded, the prompt alone
left-padded as ``prompt_input_ids``/``prompt_attention_mask``."""
from __future__ import annotations

import torch

from .models import VOCAB

PAD, EOS = 0, 2


def chat_batch(batch: int = 3, prompt: int = 5, completion: int = 4, seed: int = 0, vocab: int = VOCAB) -> dict:
    """Rows of different prompt and completion lengths (row 0 the longest of both); completions end in EOS."""
    g = torch.Generator().manual_seed(seed)
    p_len = torch.randint(1, prompt + 1, (batch,), generator=g)
    c_len = torch.randint(1, completion + 1, (batch,), generator=g)
    p_len[0], c_len[0] = prompt, completion
    width = int((p_len + c_len).max())
    input_ids = torch.full((batch, width), PAD)
    labels = torch.full((batch, width), -100)
    prompt_ids = torch.full((batch, prompt), PAD)
    for b in range(batch):
        p, c = int(p_len[b]), int(c_len[b])
        tokens = torch.randint(3, vocab, (p + c,), generator=g)
        tokens[-1] = EOS
        input_ids[b, :p + c] = tokens
        labels[b, p:p + c] = tokens[p:]
        prompt_ids[b, prompt - p:] = tokens[:p]
    column = torch.arange(width)[None]
    return {"input_ids": input_ids, "attention_mask": (column < (p_len + c_len)[:, None]).long(), "labels": labels,
            "prompt_input_ids": prompt_ids,
            "prompt_attention_mask": (torch.arange(prompt)[None] >= (prompt - p_len)[:, None]).long()}


class ChatDataset(torch.utils.data.Dataset):
    """``n`` samples of :func:`chat_batch` rows, padded to the widest (what a collate of chat_loader gives)."""

    def __init__(self, n: int = 12, prompt: int = 5, completion: int = 4, seed: int = 0):
        b = chat_batch(n, prompt, completion, seed)
        self.items = [{k: v[i] for k, v in b.items()} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]
