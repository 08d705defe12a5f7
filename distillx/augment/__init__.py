"""Data augmentations applied to the training batch both the teacher and the student see.

The plugin manager registers :data:`BUILTIN_AUGMENTATIONS` as the built-in plugin
``distillx.augment`` (:mod:`distillx.plugin.builtins`) before any third-party plugin, through the same
``distillx_register_augmentations`` hook a third-party plugin uses. Importing this package registers
nothing; :func:`distillx.plugin.augmentation` builds a registered augmentation by name.

===============  =======================================================================
``random_crop``  pad by ``padding``, crop back at a random offset per sample (:class:`RandomCrop`)
``flip``         flip each sample along ``dims`` with probability ``p`` (:class:`Flip`)
``noise``        additive Gaussian noise of standard deviation ``std`` (:class:`Noise`)
``mixup``        mixup, Zhang et al. 2018; soft targets (:class:`Mixup`)
``cutmix``       CutMix, Yun et al. 2019; soft targets (:class:`CutMix`)
``token_mask``   replace non-pad tokens by ``mask_id`` with probability ``p`` (:class:`TokenMask`)
===============  =======================================================================

Every augmentation is called as ``aug(inputs, targets, generator) -> (inputs, targets)`` and takes
all its randomness from ``generator`` (see :mod:`distillx.augment.base` for the contract)::

    from distillx import augment, plugin

    augs = [plugin.augmentation("random_crop", padding=4), augment.Flip(),
            plugin.augmentation("mixup", alpha=0.2, num_classes=100)]
    g = torch.Generator().manual_seed(0)          # checkpoint g.get_state() for exact resume
    x, y = augment.compose(augs, x, y, g)
    augment.any_changes_inputs(augs)             # True: teacher outputs cannot be cached

Mixing augmentations (``mixes_targets``) turn class indices into soft (N, C) targets; the
Distiller's default task loss ``F.cross_entropy`` accepts those as they are.

A third-party augmentation, registered as a :class:`Augmentation` subclass (or any factory
``(**options) -> callable(inputs, targets, generator) -> (inputs, targets)``)::

    from distillx.plugin import hookimpl

    @hookimpl
    def distillx_register_augmentations(registry):
        registry.add(Invert.name, Invert)
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Iterable

from .base import Augmentation
from .image import Flip, Noise, RandomCrop
from .mixing import CutMix, Mixup
from .sampling import sample_beta, sample_gamma
from .text import TokenMask

BUILTIN_AUGMENTATIONS = MappingProxyType({cls.name: cls for cls in (
    RandomCrop, Flip, Noise, Mixup, CutMix, TokenMask)})
"""name -> :class:`Augmentation` subclass for the six built-in augmentations (read-only)."""


def _label(aug: Any) -> str:
    return getattr(aug, "name", None) or getattr(aug, "__qualname__", None) or type(aug).__name__


def compose(augmentations: Iterable[Any], inputs: Any, targets: Any, generator) -> tuple[Any, Any]:
    """Apply ``augmentations`` in order, each to the previous one's ``(inputs, targets)``."""
    for aug in augmentations:
        result = aug(inputs, targets, generator)
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise TypeError(f"augmentation {_label(aug)!r} must return (inputs, targets), got "
                            f"{type(result).__name__}")
        inputs, targets = result
    return inputs, targets


def any_changes_inputs(augmentations: Iterable[Any]) -> bool:
    """Whether any augmentation changes the inputs (one without ``changes_inputs`` is assumed to)."""
    return any(bool(getattr(aug, "changes_inputs", True)) for aug in augmentations)


def any_mixes_targets(augmentations: Iterable[Any]) -> bool:
    """Whether any augmentation returns soft mixed targets (one without ``mixes_targets`` is assumed not to)."""
    return any(bool(getattr(aug, "mixes_targets", False)) for aug in augmentations)


__all__ = ["Augmentation", "RandomCrop", "Flip", "Noise", "Mixup", "CutMix", "TokenMask", "BUILTIN_AUGMENTATIONS",
           "compose", "any_changes_inputs", "any_mixes_targets", "sample_beta", "sample_gamma"]
