"""Text files to mapping batches: ``.txt`` (one example per non-empty line) or ``.jsonl`` (one JSON
object per line, the text under ``field``), tokenized once with a tokenizer (truncated to
``max_length``), padded per batch by ``tokenizer.pad``: ``{"input_ids", "attention_mask", ...}``.

Prompt/completion data for causal LMs is :func:`chat_loader` (:mod:`distillx.hf.chat`), here too."""
from __future__ import annotations

import json
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .. import _checks
from ._files import check_file, numbered_lines
from .chat import chat_loader


def read_texts(path: str, field: str = "text") -> list[str]:
    """The examples of a UTF-8 ``.txt`` or ``.jsonl`` file; errors name the file (a missing one, a
    directory, another kind) and, for its content, the line."""
    ext = check_file(path, "text file", "a .txt (one example per line) or .jsonl file", (".txt", ".jsonl"))
    texts = []
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        if ext == ".txt":
            texts.append(line.rstrip("\n"))
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not a JSON object ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path}:{number}: expected an object with a string {field!r} (field=), got {keys}")
        texts.append(obj[field])
    if not texts:
        raise ValueError(f"text file {path!r} holds no examples")
    return texts


class TokenizedTexts(Dataset):
    """A map-style dataset of tokenized examples: item ``i`` is ``{"input_ids": [...], ...}``."""

    def __init__(self, texts: list[str], tokenizer: Any, max_length: int):
        _checks.integer("max_length", max_length, ge=1)
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.items = [{k: v[i] for k, v in enc.items()} for i in range(len(texts))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class PadCollate:
    """``tokenizer.pad`` of a list of tokenized examples into a dict of (B, L) tensors (picklable)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, items: list) -> dict:
        return dict(self.tokenizer.pad(items, return_tensors="pt"))


def text_loader(path: str, tokenizer: Any, *, max_length: int = 128, batch_size: int = 16, field: str = "text",
                shuffle: bool = True, seed: int = 0) -> DataLoader:
    """A DataLoader of mapping batches over the examples of ``path`` (shuffled by a generator seeded
    with ``seed``, so a resumed run sees the same order)."""
    _checks.integer("batch_size", batch_size, ge=1)
    return texts_loader(read_texts(path, field), tokenizer, max_length=max_length, batch_size=batch_size,
                        shuffle=shuffle, seed=seed)


def texts_loader(texts: list[str], tokenizer: Any, *, max_length: int = 128, batch_size: int = 16,
                 shuffle: bool = True, seed: int = 0) -> DataLoader:
    """:func:`text_loader` over examples already read (a ``datasets`` column, a list)."""
    _checks.integer("batch_size", batch_size, ge=1)
    dataset = TokenizedTexts(texts, tokenizer, max_length)
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=PadCollate(tokenizer))


__all__ = ["read_texts", "TokenizedTexts", "PadCollate", "text_loader", "texts_loader", "chat_loader"]
