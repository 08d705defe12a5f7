"""Which tensors of a model a weight transfer covers, and the output layer it treats specially."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def transferable_tensors(model: nn.Module, *, aliases: bool = False) -> dict[str, tuple[torch.Tensor, str]]:
    """``name -> (tensor, kind)`` for every tensor a transfer may write, in ``state_dict`` order.

    ``kind`` is ``"parameter"`` or ``"buffer"``. Parameters are all included; buffers only when
    floating point and persistent (BatchNorm running mean/var: they must follow the channels the
    weights were taken from, or the student normalises with the wrong statistics). Integer buffers
    (``num_batches_tracked``) and non-persistent caches are not weights.

    A tensor shared under several names (tied embeddings: ``head.weight is emb.weight``) appears
    once, under its first name, as in ``named_parameters()``: that is the set a transfer *writes*,
    each tensor once. ``aliases=True`` lists it under every name it is reachable by (the
    ``state_dict`` keys), the set to *look up* a teacher tensor in, so that a tied teacher's
    ``head.weight`` is found although ``named_parameters()`` only shows ``emb.weight``.
    """
    params = {id(p): n for n, p in model.named_parameters()}
    buffers = {id(b): n for n, b in model.named_buffers() if torch.is_floating_point(b)}
    out: dict[str, tuple[torch.Tensor, str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        first = params.get(id(tensor)), buffers.get(id(tensor))
        if first[0] is not None and (aliases or first[0] == name):
            out[name] = (tensor, "parameter")
        elif first[1] is not None and (aliases or first[1] == name):
            out[name] = (tensor, "buffer")
    return out


def tied_names(model: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` for every transferable tensor reachable under more than one name.

    ``{"head.weight": "emb.weight"}`` for a language model whose output layer reuses the embedding.
    Empty for a model without tied tensors.
    """
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, (tensor, _) in transferable_tensors(model, aliases=True).items():
        if id(tensor) in first:
            out[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return out


def _inside_attention(path: str, model: nn.Module) -> bool:
    # nn.MultiheadAttention keeps out_proj as an nn.Linear but applies it functionally: it is no
    # output layer of the model.
    parts = path.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), nn.MultiheadAttention):
            return True
    return False


def output_layer(model: nn.Module) -> Optional[str]:
    """Dotted path of the model's output layer: its last ``nn.Linear`` in registration order.

    Registration order is the order of ``named_modules()``, which for the usual
    ``embed -> blocks -> norm -> head`` models is execution order. Linear layers inside
    ``nn.MultiheadAttention`` are skipped. ``None`` when the model has no ``nn.Linear`` (a fully
    convolutional net); a model whose head is registered before its body needs an explicit name.

    A Hugging Face model (``get_output_embeddings`` and ``base_model``): its output embeddings (a
    language model's ``lm_head``), else the last ``nn.Linear`` outside the base model (a task head,
    e.g. ``classifier``), else none: a bare encoder's pooler is not an output layer.
    """
    get = getattr(model, "get_output_embeddings", None)
    base = getattr(model, "base_model", None)
    if callable(get) and isinstance(base, nn.Module):
        head = get()
        path = next((p for p, m in model.named_modules() if m is head), None) if head is not None else None
        if path:
            return path
        prefix = next((p for p, m in model.named_modules() if m is base), "")
        if not prefix:  # the base model itself (BertModel, LlamaModel): no output layer
            return None
        outside = [p for p, m in model.named_modules()
                   if isinstance(m, nn.Linear) and p and not p.startswith(prefix + ".")]
        return outside[-1] if outside else None
    last = None
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and path and not _inside_attention(path, model):
            last = path
    return last


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(module, local name)`` owning the tensor ``name`` (``"encoder.0.weight"`` -> (encoder[0], "weight"))."""
    path, _, local = name.rpartition(".")
    return (model.get_submodule(path) if path else model), local
