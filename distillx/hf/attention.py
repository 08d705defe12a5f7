"""Self-attention layers of transformer families found, not spelled out: where a model's q/k/v
projections are, how their outputs split into q, k and v, and how many heads they have.

Found by module names and ``model.config`` (duck typing: transformers is never imported here):

==============================  ===========================================  =====================
family                          q/k/v submodules of the attention module      heads from
==============================  ===========================================  =====================
BERT, RoBERTa, ELECTRA, ...     ``query``, ``key``, ``value``                 ``num_attention_heads``
DistilBERT                      ``q_lin``, ``k_lin``, ``v_lin``               ``n_heads``
LLaMA, Mistral, Qwen, ...       ``q_proj``, ``k_proj``, ``v_proj``            ``num_attention_heads``,
                                (k/v narrower with grouped-query attention)  ``num_key_value_heads``
GPT-2                           one fused ``c_attn`` (Conv1D) = [q | k | v]   ``n_head``
==============================  ===========================================  =====================

A layer is ``"last"``, an index into the layer stack (the ``nn.ModuleList`` that holds the
attention layers: ``encoder.layer``, ``transformer.h``, ``model.layers``; negative indices count
from the end) or a dotted path (the attention module itself, or a module holding exactly one,
such as a whole layer). Explicit projection names (``projections=("wq", "wk", "wv")``) replace the
built-in ones.

Projections wrapped by PEFT adapters (LoRA's ``lora.Linear`` around the ``nn.Linear``, kept as its
``base_layer``) count as the projections: their outputs, captured by hooks, include the adapter's
update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from torch import nn

from ..features import FeaturePathError, resolve_module, unwrap_model

#: separate q/k/v submodule names, in the order they are tried, with the families that use them
SEPARATE = {("query", "key", "value"): "BERT/RoBERTa", ("q_lin", "k_lin", "v_lin"): "DistilBERT",
            ("q_proj", "k_proj", "v_proj"): "LLaMA/Mistral/Qwen"}
#: fused [q | k | v] submodule names
FUSED = {"c_attn": "GPT-2"}
_HEAD_ATTRS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")

Layer = Union[str, int]


class AttentionNotFoundError(FeaturePathError):
    """No self-attention with q/k/v projections where one was looked for; the message says what was
    looked for and what the model has."""


@dataclass(frozen=True)
class AttentionLayout:
    """One self-attention layer of a model.

    ``q``/``k``/``v``: module paths whose outputs hold the projections, tokens first (B, L, width);
    with a fused projection all three are the same module and ``chunks`` = 3 (q, k, v are its
    output's thirds, in that order). ``widths``: the output widths of q, k, v. ``heads``/``kv_heads``:
    query and key/value head counts (None when neither the config nor the module says).
    """

    path: str
    q: str
    k: str
    v: str
    widths: tuple
    heads: Optional[int] = None
    kv_heads: Optional[int] = None
    chunks: int = 1

    def capture(self, proj: str) -> tuple[str, dict]:
        """``(module path, chunk reduction options)`` of projection ``proj`` (``"q"``, ``"k"``, ``"v"``)."""
        index = "qkv".index(proj)
        return getattr(self, proj), {"chunks": self.chunks, "index": index if self.chunks > 1 else 0}

    def width(self, proj: str) -> int:
        return self.widths["qkv".index(proj)]

    def heads_of(self, proj: str) -> Optional[int]:
        """Query heads for q, key/value heads for k and v."""
        return self.heads if proj == "q" else self.kv_heads


def _out_width(module: Optional[nn.Module]) -> Optional[int]:
    # A PEFT adapter layer (LoRA's lora.Linear, ...) keeps the projection as ``base_layer`` and adds
    # to its output, whose width is the projection's.
    base = module._modules.get("base_layer") if isinstance(module, nn.Module) else None
    if base is not None:
        module = base
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None and weight.dim() == 2:
        return weight.shape[1]  # transformers' Conv1D stores (in, out)
    return None


def _projections(module: nn.Module, names: Optional[Sequence[str]]) -> Optional[tuple[tuple[str, ...], int]]:
    """``(child names of q, k, v, chunks)`` when ``module`` is an attention with those projections."""
    children = module._modules
    candidates = [tuple(names)] if names is not None else list(SEPARATE)
    for triple in candidates:
        if all(children.get(n) is not None for n in triple):
            return triple, 1
    if names is None:
        for fused in FUSED:
            width = _out_width(children.get(fused))
            if width is not None and width % 3 == 0:
                return (fused,) * 3, 3
    return None


def is_attention(module: nn.Module, projections: Optional[Sequence[str]] = None) -> bool:
    """Whether ``module`` holds q/k/v projections (the given names, or a known family's)."""
    return _projections(module, projections) is not None


def attention_paths(model: nn.Module, projections: Optional[Sequence[str]] = None) -> list[str]:
    """Paths of every module holding q/k/v projections, in registration order."""
    return [path for path, module in unwrap_model(model).named_modules() if _projections(module, projections)]


def _looked_for(projections: Optional[Sequence[str]]) -> str:
    if projections is not None:
        return f"submodules named {'/'.join(projections)} (projections={tuple(projections)!r})"
    return ("submodules named " + ", ".join(f"{'/'.join(t)} ({fam})" for t, fam in SEPARATE.items())
            + ", or a fused " + ", ".join(f"{n} ({fam})" for n, fam in FUSED.items()))


def _found(model: nn.Module, under: str = "") -> str:
    names = [p for p, _ in model.named_modules() if p and (not under or p.startswith(under + "."))]
    attn = [p for p in names if any(w in p.rsplit(".", 1)[-1].lower() for w in ("attn", "attention", "self"))]
    shown = attn or names
    more = f", ... ({len(shown)} in all)" if len(shown) > 10 else ""
    label = "attention-like modules" if attn else "modules"
    return f"its {label}: {', '.join(shown[:10]) + more}" if shown else "it has no submodules"


def _stack(model: nn.Module, paths: list[str]) -> tuple[str, int]:
    """``(path, length)`` of the layer stack (ModuleList/Sequential) holding the most attention modules."""
    counts: dict[str, set] = {}
    for path in paths:
        parts = path.split(".")
        for i in range(len(parts) - 1, -1, -1):
            if parts[i].isdigit():
                parent = ".".join(parts[:i])
                if isinstance(model.get_submodule(parent), (nn.ModuleList, nn.Sequential)):
                    counts.setdefault(parent, set()).add(parts[i])
                    break
    if not counts:
        raise AttentionNotFoundError(f"the attention modules {paths[:4]} are in no layer stack (nn.ModuleList); "
                                     "name the layer by its path")
    stack = max(counts, key=lambda p: len(counts[p]))
    return stack, len(model.get_submodule(stack))


def _as_index(layer: Layer) -> Optional[int]:
    if layer == "last":
        return -1
    if isinstance(layer, int) and not isinstance(layer, bool):
        return layer
    if isinstance(layer, str) and layer.lstrip("+-").isdigit():
        return int(layer)
    return None


def find_attention(model: nn.Module, layer: Layer = "last", projections: Optional[Sequence[str]] = None,
                   name: str = "model") -> AttentionLayout:
    """The :class:`AttentionLayout` of ``layer`` in ``model`` (see the module docstring).

    Raises :class:`AttentionNotFoundError` (what was looked for, what exists) or ``IndexError`` for a
    layer index outside the stack. ``name`` ("student"/"teacher") labels the messages.
    """
    model = unwrap_model(model)
    if isinstance(layer, bool) or not isinstance(layer, (str, int)) or layer == "":
        raise TypeError(f"{name}: a layer must be 'last', an index into the layer stack or a module path, "
                        f"got {layer!r}")
    index = _as_index(layer)
    if index is not None:
        paths = attention_paths(model, projections)
        if not paths:
            raise AttentionNotFoundError(f"{name} ({type(model).__name__}): found no self-attention layer: looked for "
                                         f"modules with {_looked_for(projections)}; {_found(model)}")
        stack, n = _stack(model, paths)
        if not -n <= index < n:
            where = repr(stack) if stack else "(the model itself)"
            raise IndexError(f"{name}: layer index {index} is out of range: the layer stack {where} has {n} layers "
                             f"(indices 0..{n - 1}, or -{n}..-1)")
        prefix = f"{stack}.{index % n}" if stack else str(index % n)
        inside = [p for p in paths if p.startswith(prefix + ".") or p == prefix]
        if not inside:
            raise AttentionNotFoundError(f"{name}: layer {prefix!r} holds no attention with {_looked_for(projections)}")
        path = inside[0]  # a decoder layer's self-attention comes before its cross-attention
    else:
        module, path = resolve_module(model, layer, name=name)
        if not _projections(module, projections):
            inside = [p for p in attention_paths(module, projections)]
            if not inside:
                raise AttentionNotFoundError(f"{name}: {layer!r} is no attention module and holds none: looked for "
                                             f"modules with {_looked_for(projections)}; {_found(model, path)}")
            path = f"{path}.{inside[0]}" if path else inside[0]
    return layout_at(model, path, projections)


def layout_at(model: nn.Module, path: str, projections: Optional[Sequence[str]] = None) -> AttentionLayout:
    """The :class:`AttentionLayout` of the attention module at ``path`` (which has the projections)."""
    module = model.get_submodule(path)
    names, chunks = _projections(module, projections)
    full = [f"{path}.{n}" if path else n for n in names]
    widths = [_out_width(module._modules[n]) for n in names]
    if chunks > 1:
        widths = [widths[0] // 3] * 3
    heads = _count(model, module, _HEAD_ATTRS)
    kv = _count(model, module, _KV_ATTRS) or heads
    return AttentionLayout(path, *full, widths=tuple(widths), heads=heads, kv_heads=kv, chunks=chunks)


def _count(model: nn.Module, module: nn.Module, attrs: Sequence[str]) -> Optional[int]:
    config = getattr(model, "config", None)
    for source in (config, module):
        for attr in attrs:
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def relation_heads(student: Sequence[AttentionLayout], teacher: Sequence[AttentionLayout],
                   projections: Sequence[str]) -> int:
    """A relation-head count for MiniLMv2 that divides every projection width of both sides: the
    teacher's heads, else the student's, else their key/value heads (the first that fits)."""
    widths = {layout.width(p) for layout in [*student, *teacher] for p in projections}
    candidates = [getattr(layout, attr) for attr in ("heads", "kv_heads") for layout in [*teacher, *student]]
    for count in candidates:
        if count and all(w % count == 0 for w in widths):
            return count
    raise ValueError(f"no head count of the models ({sorted({c for c in candidates if c})}) divides every q/k/v "
                     f"width ({sorted(widths)}); give num_relation_heads")


__all__ = ["AttentionLayout", "AttentionNotFoundError", "find_attention", "attention_paths", "is_attention", "layout_at",
           "relation_heads", "SEPARATE", "FUSED"]
