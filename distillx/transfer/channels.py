r"""Channel spaces of plain CNNs and MLPs: which tensor dimensions index the same channels.

Pruning a width (Minitron: S. T. Sreenivas et al., "LLM Pruning and Distillation in Practice: The
Minitron Approach", 2024; S. Muralidharan et al., "Compact Language Models via Pruning and
Knowledge Distillation", 2024) must remove a channel from *every* tensor that indexes it: a conv's
output rows, its bias, the next BatchNorm's weight, bias and running statistics, the next conv's
input columns, and, across a residual add, every block of the stage. :func:`channel_groups` finds
those sets, the *channel spaces*, by tracing the model with ``torch.fx`` and joining spaces with
union-find along the graph:

- ``Conv1d/2d/3d`` (and ``ConvTranspose``) and ``Linear`` (and ``Embedding``) create a space, their
  output channels, and read their input's at dim 1 (conv) or the last dim (linear). A depthwise
  conv (``groups == in_channels == out_channels``) keeps its input's space; other grouped convs
  make both spaces fixed;
- BatchNorm / InstanceNorm (dim 1), LayerNorm / RMSNorm (over the channel dim only), activations,
  dropout, identity and pooling pass the space through; PReLU with one weight per channel and a
  parameter combined elementwise (a layer scale) become members;
- ``add``/``sub``/``mul``/``div`` of two tensors *unify* their spaces (residuals, squeeze-excite);
- ``flatten``/``view``/``reshape``/``squeeze``/``unsqueeze`` pass the space when the channels stay
  one axis of the result (a global pool to 1x1 then flatten: checked on the shapes
  ``ShapeProp`` records for the example inputs), and make it fixed otherwise;
- a mean/sum/amax over the other dims (global pooling by hand) passes the space;
- everything else (``cat``, ``matmul``, ``transpose``, indexing, GroupNorm, unknown functions,
  methods and modules) makes the spaces it reads **fixed**, as do the model's inputs and outputs
  (class logits): a fixed space keeps its size.

:func:`channel_importance` (:mod:`distillx.transfer.channel_scores`) scores each prunable space's
channels on calibration data; :func:`channel_indices` turns scores into the teacher indices each
student tensor keeps.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .calibration import model_device, to_device
from .channel_graph import POINT_KINDS, ChannelPlan, ChannelSpace, SpaceBuilder, positional, trace
from .channel_scores import ChannelIndices, channel_importance, channel_indices, top_channels
from .errors import TransferError


@torch.no_grad()
def channel_groups(model: nn.Module, example_inputs: Any) -> ChannelPlan:
    """The channel spaces of ``model`` (see the module docstring for the rules).

    ``example_inputs``: what ``model`` is called with: a tensor, a tuple of positional inputs or a
    mapping of keyword inputs, run once in ``eval()`` mode (the modes are restored) to record the
    shapes that decide whether a ``flatten``/``view`` keeps the channels one axis. A model
    ``torch.fx`` cannot trace is a :class:`TransferError` with fx's reason.
    """
    gm = trace(model)
    args = to_device(positional(gm, example_inputs, "example_inputs"), model_device(model))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    gm.eval()
    try:
        ShapeProp(gm).propagate(*args)
    except Exception as exc:  # noqa: BLE001 - the model's own error, named with its context
        raise TransferError(f"running {type(model).__name__}'s traced graph on example_inputs failed "
                            f"({type(exc).__name__}: {exc})") from exc
    finally:
        for m, training in modes:
            m.train(training)
    builder = SpaceBuilder(model)
    for node in gm.graph.nodes:
        builder.node(node)
    return builder.plan()


__all__ = ["channel_groups", "channel_importance", "channel_indices", "top_channels", "ChannelPlan", "ChannelSpace",
           "ChannelIndices", "POINT_KINDS"]
