"""The output layer of a model: the Hugging Face ``get_output_embeddings()`` (a causal LM's
``lm_head``, tied to the input embeddings or not), else the model's last ``nn.Linear``."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..features import resolve_module, unwrap_model
from ..transfer.tensors import output_layer as last_linear


def output_layer(model: nn.Module, path: Optional[str] = None, name: str = "model") -> tuple[str, nn.Module]:
    """``(path, module)`` of ``model``'s output layer: ``path`` when given, else
    ``model.get_output_embeddings()`` (transformers), else the last ``nn.Linear``. The module must
    hold a 2-D ``weight`` (vocab, hidden) — an ``nn.Linear`` or alike."""
    model = unwrap_model(model)
    if path is not None:
        module, path = resolve_module(model, path, name=name)
    else:
        get = getattr(model, "get_output_embeddings", None)
        module = get() if callable(get) else None
        if module is not None:
            path = next((p for p, m in model.named_modules() if m is module), None)
        if module is None or path is None:
            path = last_linear(model)
            if path is None:
                raise ValueError(f"{name} ({type(model).__name__}) has no output layer: no get_output_embeddings() "
                                 "and no nn.Linear; name it (student_head=/teacher_head=)")
            module = model.get_submodule(path)
    weight = getattr(module, "weight", None)
    if getattr(weight, "dim", lambda: 0)() != 2:
        raise ValueError(f"{name}: the output layer {path!r} ({type(module).__name__}) has no 2-D weight "
                         "(vocab, hidden); name a linear output layer")
    return path, module


__all__ = ["output_layer"]
