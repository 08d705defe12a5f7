r"""Prompt/completion data for causal LMs (:func:`chat_loader`, ``[data.chat]`` in run configs).

A ``.jsonl`` file, one JSON object per non-empty line, in either form (both may mix in one file):

- ``{"prompt": str, "completion": str}``: the prompt is tokenized with the tokenizer's special
  tokens (the BOS where it adds one), the completion on its own without them (so the space between
  the two, where the text needs one, belongs in one of them: ``"completion": " Paris."``);
- ``{"messages": [{"role": str, "content": str}, ...]}``: rendered with the tokenizer's chat
  template. The last message must be the assistant's: it is the completion; the prompt is the
  template's rendering of the messages before it with the generation prompt (the assistant header),
  and the completion is what the full conversation's rendering adds after that, so the template's
  own end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``) is part of the completion. Both texts are
  tokenized without special tokens (the template writes them).

Rules, in order:

1. **EOS**: with ``add_eos`` (default) the tokenizer's EOS token is appended to the completion
   unless its tokens already hold it (a completion ending with it, a chat template that closes the
   turn with it) or the tokenizer has none, so the student learns where an answer stops.
2. **Length**: prompt + completion ≤ ``max_length`` tokens. A prompt of more than
   ``max_length - 1`` tokens (at least one token is left to the completion) is an error naming the
   file and line (``truncate_prompt="error"``, the default: cutting a prompt drops its beginning,
   the BOS, the system prompt, the template's opening, which silently changes what the teacher
   conditions on), or is cut from the left to ``max_length - 1`` tokens (``truncate_prompt="left"``:
   the end of a prompt, next to the completion, matters most). Then the completion is cut from the
   right to fit (its EOS too, when it does not fit).
3. **Padding**: the tokenizer's pad token, else its EOS token (the attention masks say what is
   padding, so the value is never read), else an error.

Batches are mappings of int64 tensors:

- ``input_ids``, ``attention_mask``, ``labels`` (B, L), right-padded: prompt then completion;
  ``labels`` holds the completion's token ids and ``-100`` on prompt and padding tokens (the
  next-token task loss and ``lm_kd`` count only the completion);
- ``prompt_input_ids``, ``prompt_attention_mask`` (B, P), left-padded: the prompt alone, ready for
  generation (row ``i``'s prompt tokens are its last ``prompt_attention_mask[i].sum()`` entries).

A model is called with the keys its ``forward`` names (``engine.batches.call_model``), so a
Hugging Face model gets ``input_ids`` and ``attention_mask``, never the ``prompt_*`` keys; ``labels``
is the batch's target and is not passed either. A model whose ``forward`` takes only ``**kwargs``
gets every input key, the ``prompt_*`` ones included: give its ``forward`` named parameters.

The loader is deterministic: the file is tokenized once, and shuffling draws from a
``torch.Generator`` seeded with ``seed`` that the loader holds, so checkpoints save its state and a
resumed run sees the same order (:mod:`distillx.engine.rng`).
"""
from __future__ import annotations

import json
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .. import _checks
from ._files import check_file, numbered_lines

IGNORE_INDEX = -100
TRUNCATE_PROMPT = ("error", "left")
_EXPECTED = "a .jsonl file (one JSON object per line: prompt and completion, or messages)"


class ChatRecord:
    """One line of a chat file: ``prompt``/``completion`` strings, or ``messages`` (then ``prompt``
    and ``completion`` are None until rendered); ``where`` is ``"path:line"``."""

    __slots__ = ("where", "prompt", "completion", "messages")

    def __init__(self, where: str, prompt: Optional[str] = None, completion: Optional[str] = None,
                 messages: Optional[list] = None):
        self.where, self.prompt, self.completion, self.messages = where, prompt, completion, messages


def _check_messages(messages: Any, where: str, field: str) -> list:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: {field!r} must be a non-empty list of {{'role', 'content'}} objects, got "
                         f"{messages!r:.60}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            got = (", ".join(f"{k}: {type(v).__name__}" for k, v in m.items()) if isinstance(m, dict)
                   else type(m).__name__)
            raise ValueError(f"{where}: {field}[{i}] must be an object with string 'role' and 'content', got {{{got}}}")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message of {field!r} must be the assistant's (it is the completion), "
                         f"got role {messages[-1]['role']!r}")
    return messages


def read_chat(path: str, prompt_field: str = "prompt", completion_field: str = "completion",
              messages_field: str = "messages") -> list[ChatRecord]:
    """The examples of a UTF-8 ``.jsonl`` chat file (see the module docstring); errors name the file
    and, for its content, the line."""
    check_file(path, "chat file", _EXPECTED, (".jsonl",))
    records = []
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{where}: not a JSON object ({exc})") from None
        if isinstance(obj, dict) and messages_field in obj:
            if prompt_field in obj or completion_field in obj:
                raise ValueError(f"{where}: give either {messages_field!r} or {prompt_field!r} and "
                                 f"{completion_field!r}, not both")
            records.append(ChatRecord(where, messages=_check_messages(obj[messages_field], where, messages_field)))
        elif isinstance(obj, dict) and isinstance(obj.get(prompt_field), str) \
                and isinstance(obj.get(completion_field), str):
            records.append(ChatRecord(where, obj[prompt_field], obj[completion_field]))
        else:
            got = (", ".join(f"{k}: {type(v).__name__}" for k, v in obj.items()) if isinstance(obj, dict)
                   else type(obj).__name__)
            raise ValueError(f"{where}: expected an object with string {prompt_field!r} and {completion_field!r} "
                             f"(prompt_field=, completion_field=) or a {messages_field!r} list (messages_field=), "
                             f"got {{{got}}}")
    if not records:
        raise ValueError(f"chat file {path!r} holds no examples")
    return records


def _render(record: ChatRecord, tokenizer: Any) -> tuple[str, str]:
    """``(prompt, completion)`` texts of a ``messages`` record through the chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{record.where}: a 'messages' line needs the tokenizer's chat template, but "
                         f"{type(tokenizer).__name__} has none: set tokenizer.chat_template (a Jinja template) or "
                         "write prompt/completion lines")
    try:
        prompt = tokenizer.apply_chat_template(record.messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(record.messages, tokenize=False)
    except Exception as exc:  # a template raises what it likes (jinja2 TemplateError, its own exceptions)
        raise ValueError(f"{record.where}: the tokenizer's chat template failed: {type(exc).__name__}: {exc}") from exc
    if not full.startswith(prompt):
        raise ValueError(f"{record.where}: the chat template's rendering of the conversation does not start with its "
                         "rendering of the prompt (the messages before the last, with the generation prompt), so the "
                         "completion cannot be told apart")
    return prompt, full[len(prompt):]


def tokenize_chat(records: list[ChatRecord], tokenizer: Any, max_length: int, truncate_prompt: str = "error",
                  add_eos: bool = True) -> list[dict]:
    """``[{"prompt": ids, "completion": ids}, ...]`` of the records under the module's rules."""
    _checks.integer("max_length", max_length, ge=2)
    _checks.choice("truncate_prompt", truncate_prompt, TRUNCATE_PROMPT)
    _checks.boolean("add_eos", add_eos)
    rendered = [_render(r, tokenizer) if r.messages is not None else (r.prompt, r.completion) for r in records]
    ids = {}
    # one batched call per kind: a fast tokenizer then works on all texts in parallel
    for special in (True, False):
        rows = [i for i, r in enumerate(records) if special == (r.messages is None)]
        if rows:
            enc = tokenizer([rendered[i][0] for i in rows], add_special_tokens=special)["input_ids"]
            ids.update((i, list(e)) for i, e in zip(rows, enc))
    completions = tokenizer([c for _, c in rendered], add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    items = []
    for i, record in enumerate(records):
        prompt, completion = ids[i], list(completions[i])
        if not prompt:
            raise ValueError(f"{record.where}: the prompt has no tokens; a completion needs a prompt to follow")
        if add_eos and eos is not None and eos not in completion:
            completion.append(eos)
        if len(prompt) > max_length - 1:
            if truncate_prompt == "error":
                raise ValueError(f"{record.where}: the prompt is {len(prompt)} tokens but max_length={max_length} "
                                 f"leaves it at most {max_length - 1} (one token at least is the completion's); raise "
                                 "max_length, shorten the prompt, or cut it from the left with truncate_prompt='left'")
            prompt = prompt[len(prompt) - (max_length - 1):]
        items.append({"prompt": prompt, "completion": completion[:max_length - len(prompt)]})
    return items


class ChatExamples(Dataset):
    """A map-style dataset of tokenized examples: item ``i`` is ``{"prompt": [ids], "completion": [ids]}``."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad token id, else its EOS token id (see the module docstring)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"tokenizer ({type(tokenizer).__name__}) has neither a pad token nor an EOS token to pad chat "
                     "batches with; set tokenizer.pad_token")


class ChatCollate:
    """Chat examples into the batch of the module docstring (picklable)."""

    def __init__(self, pad_id: int):
        self.pad_id = int(pad_id)

    def __call__(self, items: list) -> dict:
        B = len(items)
        L = max(len(x["prompt"]) + len(x["completion"]) for x in items)
        P = max(len(x["prompt"]) for x in items)
        out = {"input_ids": torch.full((B, L), self.pad_id, dtype=torch.long),
               "attention_mask": torch.zeros(B, L, dtype=torch.long),
               "labels": torch.full((B, L), IGNORE_INDEX, dtype=torch.long),
               "prompt_input_ids": torch.full((B, P), self.pad_id, dtype=torch.long),
               "prompt_attention_mask": torch.zeros(B, P, dtype=torch.long)}
        for i, x in enumerate(items):
            prompt, completion = torch.tensor(x["prompt"], dtype=torch.long), torch.tensor(x["completion"],
                                                                                           dtype=torch.long)
            n, m = len(prompt), len(completion)
            out["input_ids"][i, :n + m] = torch.cat([prompt, completion])
            out["attention_mask"][i, :n + m] = 1
            out["labels"][i, n:n + m] = completion
            out["prompt_input_ids"][i, P - n:] = prompt
            out["prompt_attention_mask"][i, P - n:] = 1
        return out


def chat_loader(path: str, tokenizer: Any, max_length: int = 512, batch_size: int = 8, *, shuffle: bool = True,
                seed: int = 0, truncate_prompt: str = "error", add_eos: bool = True, prompt_field: str = "prompt",
                completion_field: str = "completion", messages_field: str = "messages") -> DataLoader:
    """A DataLoader of prompt/completion batches over the ``.jsonl`` file ``path`` (the module
    docstring has the format, the rules and the batch keys), shuffled by a generator seeded with
    ``seed``, so a resumed run sees the same order."""
    _checks.integer("batch_size", batch_size, ge=1)
    _checks.boolean("shuffle", shuffle)
    pad_id = pad_token_id(tokenizer)
    records = read_chat(path, prompt_field, completion_field, messages_field)
    dataset = ChatExamples(tokenize_chat(records, tokenizer, max_length, truncate_prompt, add_eos))
    generator = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=ChatCollate(pad_id))


__all__ = ["IGNORE_INDEX", "ChatRecord", "read_chat", "tokenize_chat", "ChatExamples", "pad_token_id", "ChatCollate",
           "chat_loader"]
