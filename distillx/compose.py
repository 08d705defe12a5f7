"""Deploy a student that consumes the teacher's features: the teacher's trunk up to a cut, then the student.

    composed = dx.compose(teacher, head, at="layer3")          # teacher layers after layer3 never run
    y = composed(x)                                             # == head(teacher trunk up to layer3 (x))
    print(dx.compose_report(composed, teacher, x))             # params and latency next to the teacher's
    dx.save_composed(composed, "model.pt")                     # the trunk's layers up to the cut + the head
    composed = dx.load_composed("model.pt", teacher_arch(), head_arch())   # weights_only=True
    program = torch.export.export(composed, (x,))               # slice and graph trunks (see Trunk)

The trunk is :class:`distillx.features.Trunk`: an ``nn.Sequential`` is sliced; other models are cut
in a ``torch.fx`` graph (``torch.compile``- and ``torch.export``-able), or, when they cannot be traced,
run with a hook that stops their forward pass at the cut (eager only).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ._atomic import save_atomic
from .features import FeatureSpec
from .features.trunk import Trunk

FORMAT = "distillx-composed"


class Composed(nn.Module):
    """``head(trunk(inputs))``: ``trunk`` a :class:`Trunk` of the teacher, ``head`` the student."""

    def __init__(self, trunk: Trunk, head: nn.Module):
        super().__init__()
        if not isinstance(trunk, Trunk):
            raise TypeError(f"trunk must be a distillx.features.Trunk, got {type(trunk).__name__}")
        if not isinstance(head, nn.Module):
            raise TypeError(f"head must be a torch.nn.Module, got {type(head).__name__}")
        self.trunk, self.head = trunk, head

    @property
    def at(self) -> str:
        return self.trunk.at

    def forward(self, *args, **kwargs):
        return self.head(self.trunk(*args, **kwargs))


def compose(teacher: nn.Module, student: nn.Module, at: Union[str, FeatureSpec],
            example_inputs: Optional[Sequence] = None) -> Composed:
    """The teacher run up to ``at`` (``"PATH"``, ``"PATH@input"``, ``"PATH:INDEX"``, ``"penultimate"``
    or a :class:`FeatureSpec` with a reduction), then ``student`` on that feature. Parameters are
    shared with ``teacher`` and ``student``, not copied. ``example_inputs`` (positional inputs of one
    forward) are needed for ``"penultimate"`` and for models that cannot be traced."""
    return Composed(Trunk(teacher, at, example_inputs), student)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def latency_ms(model: nn.Module, inputs: Any, repeats: int = 50) -> float:
    """Median wall time of one forward pass over ``inputs`` (a tensor or a tuple), in milliseconds,
    after a warm-up; the model is put in ``eval()`` mode."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    model.eval()
    for _ in range(5):
        model(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def compose_report(composed: Composed, teacher: nn.Module, inputs: Any, repeats: int = 50) -> str:
    """Parameters and latency per batch of the teacher, the trunk, the head (on the trunk's features)
    and the composed model."""
    with torch.inference_mode():
        features = composed.trunk(*(inputs if isinstance(inputs, tuple) else (inputs,)))
    rows = [("teacher", teacher, inputs), (f"trunk up to {composed.at}", composed.trunk, inputs),
            ("head (student)", composed.head, features), ("composed", composed, inputs)]
    lines = [f"{'model':<32} {'params':>12}  {'latency/batch':>13}"]
    for label, model, x in rows:
        lines.append(f"{label:<32} {num_parameters(model):>12,}  {latency_ms(model, x, repeats):>10.3f} ms")
    return "\n".join(lines)


def save_composed(composed: Composed, path: Union[str, os.PathLike]) -> None:
    """Write the cut and the weights of the trunk (only its layers up to the cut) and of the head,
    atomically; :func:`load_composed` reads it back onto the architectures."""
    spec = composed.trunk.spec
    if spec.reduction is not None and not isinstance(spec.reduction, str):
        raise ValueError("save_composed: the trunk's reduction is a callable, which a file cannot name; use a "
                         "built-in reduction (distillx.features.REDUCTIONS) to save it")
    save_atomic({"format": FORMAT, "at": composed.at, "reduction": spec.reduction,
                 "reduction_kwargs": dict(spec.reduction_kwargs), "state_dict": composed.state_dict()}, path)


def load_composed(path: Union[str, os.PathLike], teacher: nn.Module, student: nn.Module,
                  example_inputs: Optional[Sequence] = None) -> Composed:
    """Compose ``teacher`` (an architecture; its layers after the cut may hold anything) and
    ``student`` at the saved cut and load the saved weights (``torch.load(weights_only=True)``)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{os.fspath(path)!r} cannot be read as a composed model ({type(exc).__name__}: {exc})") \
            from exc
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a composed model written by distillx.save_composed")
    spec = FeatureSpec.parse(saved["at"], reduction=saved.get("reduction"),
                             reduction_kwargs=saved.get("reduction_kwargs") or {})
    composed = compose(teacher, student, spec, example_inputs)
    composed.load_state_dict(saved["state_dict"])
    return composed


__all__ = ["Composed", "compose", "compose_report", "save_composed", "load_composed", "num_parameters", "latency_ms"]
