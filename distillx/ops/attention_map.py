"""Attention transfer (AT): ``distillx::attention_map`` is the fused channel reduction
``a = mean_c |F / m|^p`` on the unit-scaled feature (``m`` = each sample's max ``|F|``, a constant:
the normalised map is scale-invariant, and ``|F/m|^p`` cannot overflow for any ``p``), one pass over
each feature map, forward and backward; pooling, L2 normalisation and the squared error act on the
small (B, H, W) maps in PyTorch.

C++: ``csrc/cpu/attention_map.cpp``, ``csrc/cuda/attention_map.cu``, checks in
``csrc/include/distillx/attention_map.h``; backward is its own op, ``distillx::attention_map_backward``
(a backward with ``create_graph=True`` differentiates the reference instead, so second-order
gradients are exact).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference as ref
from ._library import (acc_dtype, building_graph, differentiable_grads, non_differentiable, register,
                       use_kernel)

OP = "attention_map"


def _fake(feature, p):
    math = acc_dtype(feature.dtype)  # half-precision features give float32 maps and scales
    return (feature.new_empty((feature.shape[0], feature.shape[2], feature.shape[3]), dtype=math),
            feature.new_empty((feature.shape[0],), dtype=math))


def _backward_fake(grad_map, feature, scale, p):
    return feature.new_empty(feature.shape)


def _setup(ctx, inputs, output):
    ctx.p = inputs[1]
    ctx.save_for_backward(inputs[0], output[1])
    non_differentiable(ctx, output[1])


def _backward(ctx, grad, _grad_scale):
    feature, scale = ctx.saved_tensors
    if building_graph():  # create_graph=True: the same gradient, built from differentiable operations
        return differentiable_grads(lambda f: ref.unit_attention_map(f.to(acc_dtype(f.dtype)), ctx.p), [feature], [0],
                                    grad)[0], None
    return torch.ops.distillx.attention_map_backward(grad, feature, scale, ctx.p), None


register(OP, _fake, _backward, _setup)
register("attention_map_backward", _backward_fake)


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """``mean_c |f / m|^p`` (B, H, W), ``m`` each sample's max ``|f|`` (detached): the fused op where it
    has a kernel, else the reference (:func:`distillx.ops.reference.unit_attention_map`)."""
    if not use_kernel(OP, f.device):
        return ref.unit_attention_map(f.to(acc_dtype(f.dtype)), p)
    if f.device.type != "cpu":  # the CPU kernel reads half precision itself; the others take float32
        f = f.to(acc_dtype(f.dtype))
    return torch.ops.distillx.attention_map(f, float(p))[0]


def _pool_to(a: torch.Tensor, size: tuple) -> torch.Tensor:
    return a if tuple(a.shape[-2:]) == size else F.adaptive_avg_pool2d(a.unsqueeze(1), size).squeeze(1)


def attention_map_loss(f_s, f_t, p):
    """:func:`distillx.functional.attention_map_loss` on validated (B, C, H, W) maps (``f_t`` detached)."""
    a_s = attention_map(f_s, p)
    with torch.no_grad():
        a_t = attention_map(f_t, p)
    size = (min(a_s.shape[-2], a_t.shape[-2]), min(a_s.shape[-1], a_t.shape[-1]))
    a_s = F.normalize(_pool_to(a_s, size).flatten(1), dim=1, eps=1e-12)
    a_t = F.normalize(_pool_to(a_t, size).flatten(1), dim=1, eps=1e-12)
    return (a_s - a_t).pow(2).mean().to(f_s.dtype)
