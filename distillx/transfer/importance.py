r"""Activation importance of a transformer's width axes on calibration data (Minitron).

S. Muralidharan, S. T. Sreenivas, R. Joshi, M. Chochowski, M. Patwary, M. Shoeybi, B. Catanzaro,
J. Kautz, P. Molchanov, "Compact Language Models via Pruning and Knowledge Distillation", 2024, and
Sreenivas et al., "LLM Pruning and Distillation in Practice: The Minitron Approach", 2024, rank
every width axis by the magnitude of the activations that flow through it, over a small
calibration set (one forward pass, no gradients):

- **attention head** :math:`h` of a layer: :math:`\operatorname{mean}_{\text{tokens}}
  \lVert \mathrm{attn}_h \rVert_2`, the norm of the head's slice of the attention output, taken at
  the input of the output projection (``o_proj``, BERT's ``attention.output.dense``, GPT-2's
  ``attn.c_proj``);
- **MLP neuron** :math:`n` of a layer: :math:`\operatorname{mean}_{\text{tokens}} |a_n|`, the
  activation entering the down projection (``mlp.down_proj``, ``output.dense``, ``mlp.c_proj``,
  ``ffn.lin2``);
- **residual (embedding) channel** :math:`c`: :math:`\sum_{\text{norms}}
  \operatorname{mean}_{\text{tokens}} |\mathrm{LN}(x)_c|` over every LayerNorm/RMSNorm of the
  model's width, each norm's scores first scaled to mean 1 so no single norm dominates.

Tokens are the batch's real tokens (the attention mask leaves padding out). Grouped-query
attention is ranked per key/value group by the prune strategy (the sum of its query heads).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..hf.attention import AttentionLayout, attention_paths, layout_at
from ..hf.layouts import _output_projection
from . import calibration as calib
from .errors import TransferError

#: MLP down projections relative to a transformer layer, tried in order (the first that exists)
DOWN_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj", "ffn.lin2", "output.dense", "mlp.fc2", "mlp.dense_4h_to_h")


@dataclass
class LayerParts:
    """Where one transformer layer's width axes live."""

    layer: str                 # the layer's path (``encoder.layer.3``)
    attention: AttentionLayout
    output: Optional[tuple[str, int]]   # (output projection path, dim of its weight that holds the heads)
    down: Optional[str]        # the MLP's down projection
    head_dim: int
    intermediate: Optional[int]


@dataclass
class Importance:
    """Scores per axis: ``heads[layer]`` (query heads), ``neurons[layer]``, ``channels`` (residual)."""

    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    neurons: dict[str, torch.Tensor] = field(default_factory=dict)
    channels: Optional[torch.Tensor] = None


def _layer_of(path: str) -> str:
    """The layer holding an attention module: the path up to the stack index."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[:i + 1])
    return ""


def _in_width(module: nn.Module) -> Optional[int]:
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        return None
    return weight.shape[0] if type(module).__name__ == "Conv1D" else weight.shape[1]


def layer_parts(model: nn.Module) -> dict[str, LayerParts]:
    """``{layer path: LayerParts}`` of every self-attention layer (empty for a non-transformer)."""
    out = {}
    for path in attention_paths(model):
        layout = layout_at(model, path)
        layer = _layer_of(path)
        if layer in out or layout.heads is None:
            continue
        o = _output_projection(model, layout)
        down = None
        for rel in DOWN_PROJECTIONS:
            candidate = f"{layer}.{rel}" if layer else rel
            try:
                model.get_submodule(candidate)  # exists?
            except AttributeError:
                continue
            if o is None or candidate != o[0]:
                down = candidate
                break
        intermediate = _in_width(model.get_submodule(down)) if down else None
        out[layer] = LayerParts(layer, layout, o, down, layout.width("q") // layout.heads, intermediate)
    return out


def hidden_size(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "dim", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _norms(model: nn.Module, width: int) -> list[str]:
    return [p for p, m in model.named_modules() if p and type(m).__name__.endswith(("LayerNorm", "RMSNorm"))
            and getattr(m, "weight", None) is not None and tuple(m.weight.shape) == (width,)]


class _Accumulator:
    """Sums per-feature scores over the real tokens of every batch."""

    def __init__(self):
        self.sum: Optional[torch.Tensor] = None
        self.count = 0

    def add(self, values: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """``values``: (..., F) per token; ``mask``: (B, L) or None."""
        v = values.detach().float()
        if mask is not None and v.dim() == 3 and tuple(mask.shape) == tuple(v.shape[:2]):
            v = v[mask.to(v.device)]
        v = v.reshape(-1, v.shape[-1])
        s = v.sum(0).cpu()
        self.sum = s if self.sum is None else self.sum + s
        self.count += v.shape[0]

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


def measure(model: nn.Module, calibration: Any, who: str, max_batches: Optional[int] = None) -> Importance:
    """One pass of ``model`` (eval, no grad) over the calibration batches: the scores of the module
    docstring. Raises :class:`TransferError` when nothing can be ranked or no batch came."""
    parts = layer_parts(model)
    width = hidden_size(model)
    norms = _norms(model, width) if width else []
    if not parts and not norms:
        raise TransferError(f"{who}: found no attention heads, MLP or normalisation layers to rank in the "
                            f"{type(model).__name__}")
    heads = {layer: _Accumulator() for layer in parts if parts[layer].output}
    neurons = {layer: _Accumulator() for layer in parts if parts[layer].down}
    channels = {p: _Accumulator() for p in norms}
    mask_box: list = [None]
    handles = []

    def pre(acc, split=None):
        def hook(module, args):
            x = args[0]
            if split is not None:  # (B, L, heads * head_dim) -> per-head norms
                x = x.reshape(*x.shape[:-1], split, -1).float().norm(dim=-1)
            else:
                x = x.abs()
            acc.add(x, mask_box[0])
        return hook

    def post(acc):
        def hook(module, args, output):
            acc.add(output.abs(), mask_box[0])
        return hook

    for layer, acc in heads.items():
        handles.append(model.get_submodule(parts[layer].output[0]).register_forward_pre_hook(
            pre(acc, parts[layer].attention.heads)))
    for layer, acc in neurons.items():
        handles.append(model.get_submodule(parts[layer].down).register_forward_pre_hook(pre(acc)))
    for path, acc in channels.items():
        handles.append(model.get_submodule(path).register_forward_hook(post(acc)))
    was = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for batch in calib.batches(calibration, who, max_batches, progress=True):
                mask_box[0] = calib.token_mask(batch)
                calib.call(model, batch, who)
                seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    calib.require_rows(seen, who)
    result = Importance(heads={k: a.mean() for k, a in heads.items()},
                        neurons={k: a.mean() for k, a in neurons.items()})
    if channels:
        scaled = [a.mean() / a.mean().mean().clamp_min(1e-30) for a in channels.values()]
        result.channels = torch.stack(scaled).sum(0)
    return result
