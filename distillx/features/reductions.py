"""Capture-time reductions: applied inside the forward hook, so only the reduced tensor is kept.

Each reduction is a function ``f(feature, **options)`` of the captured tensor. Shapes use ``B`` for
the batch (always dim 0), ``C`` for channels (``channel_dim``, default 1) and ``S`` for the
remaining ("spatial") dims: ``(B, C, H, W)`` maps, ``(B, C, L)`` sequences; transformer tokens
``(B, L, D)`` are handled by passing ``channel_dim=-1``.

Each runs as compiled kernels with no full-size temporaries besides a float32 copy of a half-precision
input: ``attention_map`` on a (B, C, H, W) map is the fused ``distillx::attention_map`` op (one pass
over the feature); pooling and channel statistics are single native ATen kernels
(``adaptive_avg_pool``, ``var_mean``, float32 accumulation); ``l2_normalize`` is a norm and a
division. float16/bfloat16 inputs are reduced in float32 and the result is cast back to the input
dtype. They are differentiable, so a student-side capture keeps its graph.
"""
from __future__ import annotations

from collections import namedtuple
from types import MappingProxyType
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import _checks
from ..ops.attention_map import attention_map as fused_attention_map
from ..ops.reference import unit_scale

ChannelStats = namedtuple("ChannelStats", ["mean", "var"])
ChannelStats.__doc__ = "Per-channel statistics from :func:`channel_stats`: ``mean`` and ``var``, each of shape (C,)."

_LOW_PRECISION = (torch.float16, torch.bfloat16)
Size = Union[int, Sequence[int]]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in _LOW_PRECISION else x


def _check(feature, reduction: str, min_dim: int, channel_dim: Optional[int] = None) -> None:
    if not isinstance(feature, torch.Tensor):
        raise TypeError(f"reduction {reduction!r} needs a tensor, got {type(feature).__name__}")
    if not feature.is_floating_point():
        raise TypeError(f"reduction {reduction!r} needs a floating-point tensor, got {feature.dtype}")
    if feature.dim() < min_dim:
        raise ValueError(f"reduction {reduction!r} needs a tensor with at least {min_dim} dims "
                         f"(batch first), got shape {tuple(feature.shape)}")
    if channel_dim is not None:
        if not -feature.dim() <= channel_dim < feature.dim():
            raise ValueError(f"reduction {reduction!r}: channel_dim={channel_dim} is out of range for shape "
                             f"{tuple(feature.shape)}")
        if channel_dim % feature.dim() == 0:
            raise ValueError(f"reduction {reduction!r}: channel_dim must not be the batch dim 0")


def attention_map(feature: torch.Tensor, p: float = 2.0, channel_dim: int = 1, size: Optional[Size] = None,
                  eps: float = 1e-12) -> torch.Tensor:
    """Spatial attention map of Attention Transfer (Zagoruyko & Komodakis, ICLR 2017).

    ``a = mean_c |F[b, c, s]|^p`` for every sample ``b`` and spatial position ``s``, optionally
    average-pooled to ``size`` (adaptive pooling of the map, not of ``F``), flattened to
    ``(B, prod(S))`` and L2-normalised per sample: ``a_b / max(‖a_b‖₂, eps)``.

    ``(B, C, H, W) -> (B, H·W)``; with ``channel_dim=-1``, tokens ``(B, L, D) -> (B, L)``.
    Config: ``{"reduction": "attention_map", "reduction_kwargs": {"p": 2}}``.
    """
    _check(feature, "attention_map", 3, channel_dim)
    _checks.positive("attention_map: p", p)
    # Per sample on F / max|F|: the normalised map is the same, and |F|^p stays finite for any p.
    if feature.dim() == 4 and channel_dim in (1, -3):
        # (B, C, H, W): the fused channel reduction reads the map once and scales as it goes
        a = fused_attention_map(_upcast(feature), float(p))
    else:
        x = unit_scale(_upcast(feature)).abs()
        a = (x * x if p == 2 else x.pow(p)).mean(dim=channel_dim)  # (B, *S)
    if size is not None:
        a = _adaptive_avg_pool(a.unsqueeze(1), size, "attention_map").squeeze(1)
    return F.normalize(a.flatten(1), p=2.0, dim=1, eps=eps).to(feature.dtype)


def _adaptive_avg_pool(x: torch.Tensor, size: Size, reduction: str) -> torch.Tensor:
    pools = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
    spatial = x.dim() - 2
    if spatial not in pools:
        raise ValueError(f"reduction {reduction!r}: adaptive pooling needs 1 to 3 spatial dims after (B, C), "
                         f"got shape {tuple(x.shape)}")
    return pools[spatial](x, size)


def adaptive_pool(feature: torch.Tensor, output_size: Size = 1, channel_dim: int = 1,
                  flatten: bool = False) -> torch.Tensor:
    """Adaptive average pooling of the spatial dims to ``output_size``.

    ``y[b, c, i] = mean of F[b, c, s]`` over the adaptive window ``s ∈ W_i`` (as
    ``torch.nn.functional.adaptive_avg_pool{1,2,3}d``; 1 to 3 spatial dims). The channel dim is
    moved to dim 1 first, so tokens ``(B, L, D)`` with ``channel_dim=-1`` pool over ``L``
    into ``(B, D, output_size)``. ``flatten=True`` returns ``(B, C·prod(output_size))``.

    ``(B, C, H, W), output_size=1 -> (B, C, 1, 1)`` (global average pooling).
    Config: ``{"reduction": "adaptive_pool", "reduction_kwargs": {"output_size": [4, 4]}}``.
    """
    _check(feature, "adaptive_pool", 3, channel_dim)
    x = feature.movedim(channel_dim, 1) if channel_dim % feature.dim() != 1 else feature
    y = _adaptive_avg_pool(x, output_size, "adaptive_pool")
    return y.flatten(1) if flatten else y


def channel_stats(feature: torch.Tensor, channel_dim: int = 1, unbiased: bool = False) -> ChannelStats:
    """Per-channel mean and variance over the batch and every other dim.

    ``mean_c = (1/n) Σ F[..c..]`` and ``var_c = (1/(n − δ)) Σ (F[..c..] − mean_c)²`` over the
    ``n = numel / C`` elements of channel ``c``; ``δ = 1`` if ``unbiased`` else 0 (BatchNorm's
    normalisation uses δ = 0). Returns ``ChannelStats(mean, var)``, a named tuple of two (C,) tensors.

    Config: ``{"reduction": "channel_stats"}``.
    """
    _check(feature, "channel_stats", 2, channel_dim)
    x = _upcast(feature)
    dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
    var, mean = torch.var_mean(x, dim=dims, correction=1 if unbiased else 0)
    return ChannelStats(mean.to(feature.dtype), var.to(feature.dtype))


def l2_normalize(feature: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row L2 normalisation of the flattened per-sample feature.

    ``x_b = vec(F[b])``, returns ``x_b / max(‖x_b‖₂, eps)``: ``(B, ...) -> (B, prod(...))``.
    Config: ``{"reduction": "l2_normalize"}``.
    """
    _check(feature, "l2_normalize", 1)
    x = _upcast(feature).reshape(feature.shape[0], -1)
    return F.normalize(x, p=2.0, dim=1, eps=eps).to(feature.dtype)


def masked_mean(feature: torch.Tensor, normalize: bool = False, eps: float = 1e-12, *,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over the real tokens of token features: a sentence embedding without a pooling module.

    ``e_b = Σ_l m[b, l]·F[b, l] / max(Σ_l m[b, l], 1)`` for tokens ``(B, L, D) -> (B, D)``, with
    ``m`` the batch's ``attention_mask`` (True/1 = real token); the extractor passes it from the
    model call (``model(**batch)``), so padding never enters the mean. Without a mask every token
    counts. ``normalize=True`` L2-normalises each embedding: ``e_b / max(‖e_b‖₂, eps)`` (the
    sentence-transformers convention for cosine similarity).

    Config: ``{"reduction": "masked_mean", "reduction_kwargs": {"normalize": true}}``.
    """
    _check(feature, "masked_mean", 3)
    if feature.dim() != 3:
        raise ValueError(f"reduction 'masked_mean' needs token features (B, L, D), got shape {tuple(feature.shape)}")
    x = _upcast(feature)
    if attention_mask is None:
        e = x.mean(dim=1)
    else:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(feature.shape[:2]):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"reduction 'masked_mean': the attention mask has shape {got} but the tokens are "
                             f"{tuple(feature.shape[:2])} (batch, tokens)")
        m = (attention_mask != 0).to(x.dtype).unsqueeze(-1)  # (B, L, 1)
        e = (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    if normalize:
        e = F.normalize(e, p=2.0, dim=1, eps=eps)
    return e.to(feature.dtype)


masked_mean.takes_attention_mask = True  # FeatureExtractor passes the model call's attention_mask


def chunk(feature: torch.Tensor, chunks: int, index: int, dim: int = -1) -> torch.Tensor:
    """Part ``index`` of ``chunks`` equal parts along ``dim`` (a view): q, k or v of a fused projection.

    GPT-2's ``c_attn`` outputs ``[q | k | v]`` (B, L, 3H); ``chunk(x, chunks=3, index=1)`` is k
    (B, L, H). ``chunks=1`` returns the feature unchanged.
    Config: ``{"reduction": "chunk", "reduction_kwargs": {"chunks": 3, "index": 0}}``.
    """
    _check(feature, "chunk", 1)
    _checks.integer("chunk: chunks", chunks, ge=1)
    _checks.integer("chunk: index", index, ge=0)
    if index >= chunks:
        raise ValueError(f"reduction 'chunk': index={index} must be below chunks={chunks}")
    width = feature.shape[dim]
    if width % chunks:
        raise ValueError(f"reduction 'chunk': dim {dim} of shape {tuple(feature.shape)} does not split into "
                         f"{chunks} equal parts")
    return feature if chunks == 1 else feature.narrow(dim, index * (width // chunks), width // chunks)


REDUCTIONS = MappingProxyType({
    "attention_map": attention_map,
    "adaptive_pool": adaptive_pool,
    "channel_stats": channel_stats,
    "l2_normalize": l2_normalize,
    "masked_mean": masked_mean,
    "chunk": chunk,
})
"""Built-in capture-time reductions by name (read-only). A :class:`~distillx.features.FeatureSpec`
also accepts any callable ``f(feature, **options)`` as its reduction."""

__all__ = ["REDUCTIONS", "ChannelStats", "attention_map", "adaptive_pool", "channel_stats", "l2_normalize",
           "masked_mean", "chunk"]
