r"""Which teacher layers a shallower student inherits, chosen on calibration data
(``layer_map(map="auto", calibration=...)``).

A student of :math:`N_s` layers initialised from teacher layers :math:`m = (j_0 < \dots < j_{N_s-1})`
computes, at initialisation, the teacher with every other layer of the stack replaced by the
identity (when the widths are equal; the residual stream carries the hidden state past a dropped
layer). So the map whose *pruned teacher* stays closest to the teacher is the start with the least
to relearn. The search measures exactly that:

- **distance** of a map: the teacher run with the layers outside the map skipped (a forward hook
  returns the layer's input as its output), compared with the full teacher on the calibration
  batches: :math:`d(m) = \operatorname{mean}_{\text{tokens}} \big(1 - \cos(h_m, h)\big)` of the final
  hidden states (``last_hidden_state``; else the input of the output layer, the last ``nn.Linear``,
  so no (tokens x vocab) logits are kept; else the output itself), padding tokens left out through
  the attention mask;
- **search**: every sorted map when there are at most ``max_candidates`` of them
  (:math:`\binom{N_t}{N_s}`; 15 for 6 -> 2), else greedy removal: drop, one at a time, the layer
  whose removal increases :math:`d` least (the iterative layer pruning of Men et al., "ShortGPT:
  Layers in Large Language Models are More Redundant Than You Expect", 2024, with the output
  distance instead of the per-layer score);
- reported with it, each layer's **block influence** (ShortGPT):
  :math:`BI_i = 1 - \operatorname{mean}_{\text{tokens}} \cos(x_i, x_{i+1})`, how much layer i changes
  the hidden state it is given (0: it could be dropped for free).

Cost: one pass of the full teacher, then one per candidate map, over the calibration batches
(kept in memory; ``max_batches`` bounds them).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from . import calibration as calib
from .errors import TransferError
from .tensors import output_layer

MAX_CANDIDATES = 256


@dataclass
class DepthChoice:
    """The chosen map of one stack and the evidence: distances of the maps tried, block influence."""

    stack: str
    map: list[int]
    distance: float
    influence: list[float]
    search: str
    tried: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"stack": self.stack, "map": list(self.map), "distance": self.distance,
                "block_influence": [round(b, 6) for b in self.influence], "search": self.search,
                "distances": dict(self.tried)}


def _hidden_of(value: Any) -> Optional[torch.Tensor]:
    """The hidden state a layer receives or returns: a tensor, or the first element of a tuple."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class _Skipping:
    """While active, the layers of ``stack`` whose index is not in ``keep`` return their input, and
    every layer's input/output pair can be recorded (for block influence)."""

    def __init__(self, stack: nn.Module, path: str, keep: Optional[set] = None, record: Optional[list] = None):
        self.stack, self.path, self.keep, self.record = stack, path, keep, record
        self.handles: list = []
        self.inputs: dict[int, torch.Tensor] = {}

    def __enter__(self) -> "_Skipping":
        for i, layer in enumerate(self.stack):
            self.handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.inputs.clear()

    def _pre(self, i: int):
        def hook(module, args, kwargs):
            x = _hidden_of(args) if args else kwargs.get("hidden_states", _hidden_of(list(kwargs.values())))
            if x is None:
                raise TransferError(f"layer {i} of {self.path!r} takes no tensor as its first input: its hidden "
                                    "state cannot be followed")
            self.inputs[i] = x
        return hook

    def _post(self, i: int):
        def hook(module, args, output):
            x, out = self.inputs.pop(i), _hidden_of(output)
            if out is None or out.shape != x.shape:
                raise TransferError(f"layer {i} of {self.path!r} changes the hidden state's shape "
                                    f"({tuple(x.shape)} -> {None if out is None else tuple(out.shape)}): it cannot be "
                                    "skipped, so the map cannot be chosen by dropping layers; pass map= explicitly")
            if self.record is not None:
                self.record.append((i, x, out))
            if self.keep is None or i in self.keep:
                return None
            if isinstance(output, torch.Tensor):
                return x
            return type(output)((x, *output[1:])) if isinstance(output, tuple) else [x, *output[1:]]
        return hook


def _final_hidden(model: nn.Module, batch: Any, who: str) -> torch.Tensor:
    """The model's final hidden states on ``batch`` (see the module docstring)."""
    head_path = output_layer(model)
    captured = []
    handle = None
    if head_path is not None:
        handle = model.get_submodule(head_path).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    try:
        out = calib.call(model, batch, who)
    finally:
        if handle is not None:
            handle.remove()
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, Mapping):
        hidden = out.get("last_hidden_state")
    if hidden is None and captured:
        hidden = captured[-1]
    if hidden is None:
        hidden = _hidden_of(out) if not isinstance(out, Mapping) else next(
            (v for v in out.values() if isinstance(v, torch.Tensor)), None)
    if not isinstance(hidden, torch.Tensor):
        raise TransferError(f"{who}: cannot find the teacher's output on a calibration batch "
                            f"({type(out).__name__})")
    return hidden.detach().float()


def _cosine_gap(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[float, int]:
    """``(sum of 1 - cos over positions, positions)`` along the last dim, padding left out."""
    gap = 1 - nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12)
    if mask is not None and gap.dim() == 2 and tuple(mask.shape) == tuple(gap.shape):
        gap = gap[mask.to(gap.device)]
    return float(gap.sum()), gap.numel()


def _mean(pairs: list[tuple[float, int]]) -> float:
    total, n = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return total / n if n else float("nan")


class DepthSearch:
    """Runs the teacher over kept calibration batches with some layers of one stack skipped."""

    def __init__(self, teacher: nn.Module, path: str, calibration: Any, who: str, max_batches: Optional[int]):
        self.teacher, self.path, self.who = teacher, path, who
        self.stack = teacher.get_submodule(path)
        self.batches = list(calib.batches(calibration, who, max_batches, progress=True))
        calib.require_rows(len(self.batches), who)
        self.masks = [calib.token_mask(b) for b in self.batches]
        record: list = []
        with torch.no_grad(), _Skipping(self.stack, path, record=record):
            self.reference, influence = [], [[] for _ in self.stack]
            for batch, mask in zip(self.batches, self.masks):
                record.clear()
                self.reference.append(_final_hidden(teacher, batch, who))
                for i, x, out in record:
                    influence[i].append(_cosine_gap(x, out, mask))
        self.influence = [_mean(pairs) for pairs in influence]

    def distance(self, keep: tuple[int, ...]) -> float:
        with torch.no_grad(), _Skipping(self.stack, self.path, keep=set(keep)):
            return _mean([_cosine_gap(_final_hidden(self.teacher, b, self.who), ref, m)
                          for b, ref, m in zip(self.batches, self.reference, self.masks)])

    def choose(self, n_student: int, max_candidates: Optional[int] = None) -> DepthChoice:
        n = len(self.stack)
        max_candidates = MAX_CANDIDATES if max_candidates is None else max_candidates
        tried: dict[tuple[int, ...], float] = {}
        if math.comb(n, n_student) <= max_candidates:
            for keep in itertools.combinations(range(n), n_student):
                tried[keep] = self.distance(keep)
            best = min(tried, key=lambda k: (tried[k], k))
            search = f"exhaustive over {len(tried)} maps"
        else:
            best = tuple(range(n))
            while len(best) > n_student:
                options = {}
                for drop in best:
                    candidate = tuple(j for j in best if j != drop)
                    options[candidate] = tried[candidate] = self.distance(candidate)
                best = min(options, key=lambda k: (options[k], k))
            search = f"greedy removal, {len(tried)} maps evaluated"
        final = sorted(((k, v) for k, v in tried.items() if len(k) == n_student), key=lambda kv: kv[1])
        return DepthChoice(self.path, list(best), tried[best], self.influence, search,
                           {str(list(k)): round(v, 6) for k, v in final})


def choose_maps(teacher: nn.Module, stacks: dict[str, tuple[int, int]], calibration: Any, who: str,
                max_batches: Optional[int] = None) -> dict[str, DepthChoice]:
    """``{stack path: DepthChoice}`` for every stack where the student (``stacks[path] = (n_student,
    n_teacher)``) is shallower; each stack searched with the others at full depth."""
    was = teacher.training
    teacher.eval()
    try:
        out = {}
        for path, (n_s, n_t) in stacks.items():
            if n_s >= n_t:
                continue
            out[path] = DepthSearch(teacher, path, calibration, who, max_batches).choose(n_s)
        return out
    finally:
        teacher.train(was)
