"""Attention transfer (AT): ``distillx::attention_map`` is the fused channel reduction
``a = mean_c |F|^p`` (one pass over each feature map, forward and backward); pooling, L2
normalisation and the squared error act on the small (B, H, W) maps in PyTorch."""
from __future__ import annotations

import torch

from . import has_kernel
from . import reference as ref

if has_kernel("attention_map", "cpu") or has_kernel("attention_map", "cuda"):

    @torch.library.register_fake("distillx::attention_map")
    def _attention_map_fake(feature, p):
        return feature.new_empty((feature.shape[0], feature.shape[2], feature.shape[3]))

    @torch.library.register_fake("distillx::attention_map_backward")
    def _attention_map_backward_fake(grad_map, feature, p):
        return feature.new_empty(feature.shape)

    def _setup(ctx, inputs, output):
        ctx.p = inputs[1]
        ctx.save_for_backward(inputs[0])

    def _backward(ctx, grad):
        (feature,) = ctx.saved_tensors
        return torch.ops.distillx.attention_map_backward(grad, feature, ctx.p), None

    torch.library.register_autograd("distillx::attention_map", _backward, setup_context=_setup)


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """``mean_c |f|^p`` (B, H, W): the fused op where it has a kernel, else the reference."""
    if not has_kernel("attention_map", f.device.type):
        return ref.attention_map(f, p)
    acc = torch.float64 if f.dtype == torch.float64 else torch.float32
    return torch.ops.distillx.attention_map(f.to(acc), float(p))


def attention_map_loss(f_s, f_t, p):
    a_s = attention_map(f_s, p)
    with torch.no_grad():
        a_t = attention_map(f_t, p)
    size = (min(a_s.shape[-2], a_t.shape[-2]), min(a_s.shape[-1], a_t.shape[-1]))
    if tuple(a_s.shape[-2:]) != size:
        a_s = torch.nn.functional.adaptive_avg_pool2d(a_s.unsqueeze(1), size).squeeze(1)
    if tuple(a_t.shape[-2:]) != size:
        a_t = torch.nn.functional.adaptive_avg_pool2d(a_t.unsqueeze(1), size).squeeze(1)
    a_s = torch.nn.functional.normalize(a_s.flatten(1), dim=1, eps=1e-12)
    a_t = torch.nn.functional.normalize(a_t.flatten(1), dim=1, eps=1e-12)
    return (a_s - a_t).pow(2).mean().to(f_s.dtype)
