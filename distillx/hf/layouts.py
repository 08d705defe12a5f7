"""Head-aware weight-transfer layouts of transformer attention: which dims of the q/k/v and output
projections are blocks of heads (or of fused q, k, v), so that ``select``/``layer_map`` shrink each
head (each of q, k, v) on its own instead of mixing them.

For each self-attention the student has (found as in :mod:`distillx.hf.attention`):

- q rows (dim 0 of an ``nn.Linear`` weight, and its bias) are ``heads`` blocks, k/v rows
  ``kv_heads`` blocks (grouped-query attention) — when the teacher has the same head counts, so
  student head ``h`` is selected from teacher head ``h``; otherwise one block (uniform selection);
- a fused GPT-2 ``c_attn`` (``Conv1D``, weight (in, 3·H)) is 3 blocks along dim 1 (q, k, v), or
  3·heads with equal head counts;
- the output projection's input (``o_proj``, ``out_lin``, BERT's ``attention.output.dense``:
  dim 1; GPT-2's ``attn.c_proj``: dim 0) is ``heads`` blocks, matching the selected values.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..features import unwrap_model
from .attention import AttentionLayout, attention_paths, layout_at

#: output projections: (path relative to the attention module, dim of its weight that holds the heads)
OUTPUT_PROJECTIONS = (("o_proj", 1), ("out_lin", 1), ("c_proj", 0), ("..output.dense", 1))


def _owner(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _output_projection(model: nn.Module, layout: AttentionLayout) -> Optional[tuple[str, int]]:
    for rel, dim in OUTPUT_PROJECTIONS:
        if rel.startswith(".."):  # a sibling of the attention module (BERT: attention.self -> attention.output)
            parent = layout.path.rpartition(".")[0]
            path = f"{parent}.{rel[2:]}" if parent else rel[2:]
        else:
            path = f"{layout.path}.{rel}" if layout.path else rel
        module = _owner(model, path)
        if module is not None and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
            return path, dim
    return None


def attention_blocks(teacher: nn.Module, student: nn.Module) -> dict[str, dict[int, int]]:
    """``{student tensor name: {dim: blocks}}`` for the attention projections of ``student`` (see the
    module docstring). Empty for a model without recognisable self-attention."""
    teacher, student = unwrap_model(teacher), unwrap_model(student)
    t_paths = attention_paths(teacher)
    t_layout = layout_at(teacher, t_paths[0]) if t_paths else None
    out: dict[str, dict[int, int]] = {}
    for path in attention_paths(student):
        s = layout_at(student, path)
        same = (t_layout is not None and s.heads is not None
                and (s.heads, s.kv_heads) == (t_layout.heads, t_layout.kv_heads))
        heads = s.heads if same else 1
        if s.chunks > 1:
            for local in ("weight", "bias"):
                out[f"{s.q}.{local}"] = {1 if local == "weight" else 0: 3 * heads}
        else:
            for proj in "qkv":
                n = (s.heads if proj == "q" else s.kv_heads) if same else 1
                if n > 1:
                    for local in ("weight", "bias"):
                        out[f"{getattr(s, proj)}.{local}"] = {0: n}
        o = _output_projection(student, s)
        if o is not None and same and heads > 1:
            out[f"{o[0]}.weight"] = {o[1]: heads}  # (its bias is per output feature: no blocks)
    return out


__all__ = ["attention_blocks", "OUTPUT_PROJECTIONS"]
