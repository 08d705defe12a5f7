"""Finding the penultimate feature (the input of the output layer) by tracing one forward pass.

The rule. Candidate modules are the *parametrised leaves*: modules with parameters and no child
modules (``torch.nn.utils.parametrize`` containers do not count as children, nor as candidates).
During one forward pass every candidate that runs is recorded in completion order. The output
layer is

1. the last candidate whose output *is* the model's primary output tensor (the first tensor with at
   least one dim found in the model's output: the tensor itself, the first element of a tuple/list,
   the first value of a dict/``ModelOutput``, the first field of a dataclass), else
2. the last candidate that ran.

The penultimate feature is that module's positional input 0 (or the input picked by ``select``).

This finds ``fc`` in torchvision ResNets, the last ``nn.Linear`` of an MLP, ``classifier``/
``head``/``lm_head`` whatever their names, and skips parameter-free tails (Dropout, Softmax,
Identity, ``flatten``). Limits: an output layer applied functionally (``F.linear(x, self.weight)``
from a non-leaf module, or logits from a tied embedding matrix outside any leaf) is not a leaf
module, so rule 2 picks the last leaf before it (e.g. a final LayerNorm); a module with both
parameters and children is never a candidate; under ``torch.compile`` output identity is not
observable, so rule 2 decides.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Iterator, NamedTuple, Optional

import torch
from torch import nn

from .paths import model_label, unwrap_model

_PARAMETRIZATIONS = "parametrizations"


def _is_candidate(module: nn.Module) -> bool:
    children = [n for n, c in module._modules.items() if c is not None and n != _PARAMETRIZATIONS]
    return not children and next(module.parameters(), None) is not None


def candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` of every parametrised leaf of the unwrapped model, in registration order."""
    for path, module in unwrap_model(model).named_modules():
        if _PARAMETRIZATIONS in path.split("."):
            continue  # inside a torch.nn.utils.parametrize container
        if _is_candidate(module):
            yield path, module


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Tensors of a (nested) output in order: tensor, tuple/list, dict/ModelOutput values, dataclass fields."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from tensors_in(getattr(value, f.name, None))


class Record(NamedTuple):
    path: str
    module: nn.Module
    args: tuple
    kwargs: dict
    outputs: tuple  # weak references to the module's output tensors (empty under torch.compile)


class Probe:
    """Forward hooks on every candidate that record ``(path, module, args, kwargs)`` when it runs.

    It holds references to the inputs of every candidate until :meth:`remove` (one pass's worth).
    """

    def __init__(self, model: nn.Module):
        self.records: list[Record] = []
        self.handles: list = []
        self.model = model
        for path, module in candidates(model):
            self.handles.append(module.register_forward_hook(self._hook(path), with_kwargs=True))

    def _hook(self, path: str):
        def hook(module, args, kwargs, output):
            refs = () if torch.compiler.is_compiling() else tuple(weakref.ref(t) for t in tensors_in(output))
            self.records.append(Record(path, module, args, kwargs, refs))
        return hook

    def choose(self, model_output: Any, name: Optional[str] = None) -> Record:
        """The output layer's record by the module docstring's rule."""
        primary = next((t for t in tensors_in(model_output) if t.dim() > 0), None)
        if primary is not None:
            for rec in reversed(self.records):
                if any(ref() is primary for ref in rec.outputs):
                    return rec
        if self.records:
            return self.records[-1]
        n = sum(1 for _ in candidates(self.model))
        raise RuntimeError(
            f"{model_label(name)}: cannot find the penultimate feature: none of its {n} parametrised leaf modules "
            "ran during the forward pass" + (
                " (a torch.compile'd model that already ran before the hooks were attached does not see them: "
                "resolve the path with distillx.features.find_penultimate(model, example_input) on the eager "
                "model and pass that path instead)" if n else ""))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.records.clear()


def find_penultimate(model: nn.Module, *args: Any, **kwargs: Any) -> str:
    """Path of the output layer of ``model`` (whose *input* is the penultimate feature).

    Runs one forward pass ``model(*args, **kwargs)`` of the unwrapped model (eager, under
    ``torch.no_grad()``, in ``eval()`` mode; the modules' training flags are restored afterwards)
    and applies the rule in :mod:`distillx.features.penultimate`. Use the result as a feature path
    with ``capture="input"``: ``FeatureSpec(find_penultimate(model, x), capture="input")``.
    """
    base = unwrap_model(model)
    modes = [(m, m.training) for m in base.modules()]
    probe = Probe(base)
    try:
        base.eval()
        with torch.no_grad():
            output = base(*args, **kwargs)
        return probe.choose(output).path
    finally:
        probe.remove()
        for m, training in modes:
            m.training = training


__all__ = ["find_penultimate", "candidates", "tensors_in", "Probe", "Record"]
