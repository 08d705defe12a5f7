"""Per-sample geometric and photometric augmentations: ``random_crop``, ``flip``, ``noise``.

Each draws its random numbers from the generator it is given (see :mod:`distillx.augment.base`),
is vectorised over the batch, and leaves the targets untouched.
"""
from __future__ import annotations

import numbers

import torch

from .base import Augmentation


def _reflect_index(q: torch.Tensor, size: int) -> torch.Tensor:
    """Map coordinates ``q`` (any integers) into ``[0, size)`` by mirror reflection about the edges
    without repeating the edge pixel (``torch.nn.functional.pad(mode="reflect")``; for offsets of a
    size or more the reflection repeats, period 2 (size - 1), as ``numpy.pad(mode="reflect")``)."""
    if size == 1:
        return torch.zeros_like(q)
    period = 2 * (size - 1)
    m = q.remainder(period)  # in [0, period) for a positive divisor
    return torch.where(m < size, m, period - m)


class RandomCrop(Augmentation):
    """Pad images by ``padding`` pixels on every side, then crop back to (H, W) at a random offset.

    For inputs (N, C, H, W), each sample n draws its own offset (i_n, j_n) uniformly from
    {0, ..., 2 padding}^2 and becomes ``out[n, :, a, b] = pad(x)[n, :, i_n + a, j_n + b]``: a shift by
    up to ``padding`` pixels in each direction, the uncovered border filled with zeros
    (``mode="constant"``) or mirrored image content (``mode="reflect"``). The standard CIFAR
    augmentation ("RandomCrop(32, padding=4)"; Krizhevsky et al. 2012, He et al. 2016).

    Vectorised (two gathers; reflection is computed on the indices); works for any real dtype
    (uint8 images included).
    ``padding=0`` is the identity.
    """

    name = "random_crop"
    options = {"padding": 4, "mode": "constant"}

    def validate(self) -> None:
        self.check_int("padding", ge=0)
        self.check_choice("mode", ("constant", "reflect"))

    def apply(self, inputs, targets, generator):
        x = self.require_tensor(inputs, "inputs", "(N, C, H, W) images", ndim=4)
        n, c, h, w = x.shape
        p = self.padding
        offsets = self.randint(2 * p + 1, (2, n), generator, x.device)  # rows, then columns
        if p == 0 or x.numel() == 0:
            return x.clone(), targets
        rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H), in padded coordinates
        cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
        if self.mode == "reflect":  # index the input directly through the reflection
            source, rows, cols = x, _reflect_index(rows - p, h), _reflect_index(cols - p, w)
        else:
            source = torch.nn.functional.pad(x, (p, p, p, p))  # zeros
        out = source.gather(2, rows[:, None, :, None].expand(n, c, h, source.shape[3]))
        out = out.gather(3, cols[:, None, None, :].expand(n, c, h, w))
        return out, targets


class Flip(Augmentation):
    """Flip each sample along ``dims`` with probability ``p``, independently per sample.

    ``out[n] = flip(x[n], dims)`` if u_n < p else ``x[n]``, u_n ~ U[0, 1). ``dims`` index the batched
    tensor (``-1``: width, the usual horizontal flip of (N, C, H, W) images; ``(-2, -1)``: both
    axes at once); dimension 0 (the batch) cannot be flipped. Works for any real dtype and rank >= 2.
    """

    name = "flip"
    options = {"p": 0.5, "dims": (-1,)}

    def validate(self) -> None:
        self.check_number("p", ge=0, le=1)
        dims = (self.dims,) if isinstance(self.dims, numbers.Integral) and not isinstance(self.dims, bool) \
            else self.dims
        if not isinstance(dims, (tuple, list)) or not dims or any(
                isinstance(d, bool) or not isinstance(d, numbers.Integral) for d in dims):
            raise ValueError(f"augmentation {self.label!r}: option dims must be an int or a non-empty tuple of "
                             f"ints (dimensions of the batched inputs), got {self.dims!r}")
        self.dims = tuple(int(d) for d in dims)

    def apply(self, inputs, targets, generator):
        x = self.require_tensor(inputs, "inputs", "(N, ...) with at least 2 dimensions", min_ndim=2)
        dims = tuple(d % x.dim() if -x.dim() <= d < x.dim() else None for d in self.dims)
        if None in dims or 0 in dims or len(set(dims)) != len(dims):
            raise self.batch_error(f"option dims={self.dims} does not name distinct non-batch dimensions of "
                                   f"inputs of shape {tuple(x.shape)} (dimension 0 is the batch)")
        hit = self.uniform((x.shape[0],), generator, x.device) < self.p
        return torch.where(hit.view(-1, *[1] * (x.dim() - 1)), x.flip(dims), x), targets


class Noise(Augmentation):
    """Additive Gaussian noise: ``out = x + std * eps``, eps ~ N(0, I) i.i.d. per element.

    Floating-point inputs of any shape (N, ...). The noise is drawn in float32 (float64 for float64
    inputs) on the generator's device, then moved and added; the result keeps the inputs' dtype.
    """

    name = "noise"
    options = {"std": 0.1}

    def validate(self) -> None:
        self.check_number("std", ge=0)

    def apply(self, inputs, targets, generator):
        x = self.require_tensor(inputs, "inputs", "(N, ...) floating-point", floating=True, min_ndim=1)
        dtype = torch.promote_types(x.dtype, torch.float32)
        eps = torch.randn(tuple(x.shape), generator=generator, device=generator.device, dtype=dtype)
        return (x + self.std * eps.to(x.device)).to(x.dtype), targets


__all__ = ["RandomCrop", "Flip", "Noise"]
