"""The output layer of a model: the Hugging Face ``get_output_embeddings()`` (a causal LM's
``lm_head``, tied to the input embeddings or not), else the model's last ``nn.Linear``; through a
PEFT wrapper, and never one under a PEFT adapter (see :func:`output_layer`)."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..features import resolve_module, unwrap_model
from ..transfer.tensors import output_layer as last_linear


def output_layer(model: nn.Module, path: Optional[str] = None, name: str = "model") -> tuple[str, nn.Module]:
    """``(path, module)`` of ``model``'s output layer: ``path`` when given, else
    ``model.get_output_embeddings()`` (transformers), else the last ``nn.Linear``. The module must
    hold a 2-D ``weight`` (vocab, hidden) — an ``nn.Linear`` or alike. A PEFT model is searched
    inside its wrapper; an output layer under a PEFT adapter (LoRA on ``lm_head``) is a
    ``ValueError``, because its ``weight`` leaves the adapter out; ``modules_to_save`` (a trained
    copy, whose ``weight`` is the copy's) is fine."""
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
    if isinstance(module, nn.Module) and module._modules.get("base_layer") is not None:
        # PEFT's adapter layers (lora.Linear, ...) answer ``weight`` with the base layer's weight:
        # distilling through it would leave the adapter's update out of the student's logits.
        raise ValueError(f"{name}: the output layer {path!r} is wrapped by a PEFT adapter ({type(module).__module__}."
                         f"{type(module).__name__}); a method that reads the output layer's weight (lm_kd, gkd) "
                         "would miss the adapter's update. Leave it out of LoraConfig(target_modules=...), or train "
                         "a full copy of it with modules_to_save=[...]")
    weight = getattr(module, "weight", None)
    if getattr(weight, "dim", lambda: 0)() != 2:
        raise ValueError(f"{name}: the output layer {path!r} ({type(module).__name__}) has no 2-D weight "
                         "(vocab, hidden); name a linear output layer")
    return path, module


__all__ = ["output_layer"]
