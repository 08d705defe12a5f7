"""Feature extraction: capture intermediate features of a model with hooks on modules named by
dotted path, optionally reduced on the spot so only the reduced tensor is kept.

::

    from distillx.features import FeatureExtractor, FeatureSpec, PENULTIMATE

    requests = {
        "l3": "layer3",                                                    # output of model.layer3
        "at4": FeatureSpec("layer4", reduction="attention_map", reduction_kwargs={"p": 2}),
        "attn": "encoder.layer.-1.attention.self:0",                       # element 0 of a tuple output
        "ln_in": FeatureSpec("encoder.layer.0.output.LayerNorm", capture="input"),
        "pen": PENULTIMATE,                                                # input of the output layer
    }
    with FeatureExtractor(teacher, requests, name="teacher", detach=True) as ex:
        with torch.inference_mode():
            teacher(x)
    feats = ex.collect()     # every key, or MissingFeatureError saying which and why

Pieces: :class:`FeatureRequest` (what a method asks of both models), :class:`FeatureSpec` (what to capture, with the ``"PATH[@input][:SELECT]"`` string
shorthand), :class:`FeatureExtractor` (hooks, lifecycle, reading), :func:`resolve_module`
(dotted paths through DataParallel/DDP/``torch.compile`` wrappers, with close-match errors),
:func:`find_penultimate` (the output-layer rule), and the capture-time :data:`REDUCTIONS`
(``attention_map``, ``adaptive_pool``, ``channel_stats``, ``l2_normalize``, ``masked_mean``, ``chunk``).
"""
from __future__ import annotations

from .extractor import FeatureCaptureError, FeatureExtractor, MissingFeatureError
from .paths import WRAPPER_ATTRS, FeaturePathError, resolve_module, unwrap_model
from .penultimate import find_penultimate
from .reductions import (REDUCTIONS, ChannelStats, adaptive_pool, attention_map, channel_stats, chunk, l2_normalize,
                         masked_mean)
from .request import CAPTURES, FeatureRequest
from .spec import PENULTIMATE, FeatureSpec
from .trunk import CutError, Trunk, trunk

__all__ = [
    "FeatureExtractor", "FeatureSpec", "FeatureRequest", "PENULTIMATE", "CAPTURES", "Trunk", "trunk", "CutError",
    "FeatureCaptureError", "FeaturePathError", "MissingFeatureError",
    "resolve_module", "unwrap_model", "find_penultimate", "WRAPPER_ATTRS",
    "REDUCTIONS", "ChannelStats", "attention_map", "adaptive_pool", "channel_stats", "l2_normalize", "masked_mean",
    "chunk",
]
