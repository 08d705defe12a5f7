"""Hugging Face transformers support, mostly by duck typing on module names and ``model.config``
(``transformers`` is imported only by the functions that load or save pretrained models).

- :mod:`~distillx.hf.attention`: self-attention layers found per family (q/k/v paths, fused
  projections, grouped-query heads);
- :mod:`~distillx.hf.output`: a model's output layer;
- :mod:`~distillx.hf.layouts`: head-aware weight-transfer layouts of q/k/v/o projections;
- :mod:`~distillx.hf.pretrained`: load a model directory, build a student from a teacher's config,
  save with ``save_pretrained``;
- :mod:`~distillx.hf.text`: ``.txt``/``.jsonl`` text files to mapping batches with a tokenizer;
- :mod:`~distillx.hf.chat`: prompt/completion ``.jsonl`` files (or chat messages through the
  tokenizer's chat template) to batches with completion-only labels and left-padded prompts.
"""
from __future__ import annotations

from .attention import AttentionLayout, AttentionNotFoundError, find_attention
from .output import output_layer

__all__ = ["AttentionLayout", "AttentionNotFoundError", "find_attention", "output_layer"]
