"""Option validation, the Augmentation base class, compose and the helper predicates."""
from __future__ import annotations

import pytest
import torch

from distillx.augment import (BUILTIN_AUGMENTATIONS, Augmentation, CutMix, Flip, Mixup, Noise, RandomCrop, TokenMask,
                              any_changes_inputs, any_mixes_targets, compose)


@pytest.mark.parametrize("cls, defaults", [
    (RandomCrop, {"padding": 4, "mode": "constant"}),
    (Flip, {"p": 0.5, "dims": (-1,)}),
    (Noise, {"std": 0.1}),
    (Mixup, {"alpha": 0.2, "num_classes": None}),
    (CutMix, {"alpha": 1.0, "num_classes": None}),
    (TokenMask, {"p": 0.15, "mask_id": None, "pad_id": None, "special_ids": ()}),
])
def test_defaults_and_flags(cls, defaults):
    assert cls.default_options() == defaults
    assert BUILTIN_AUGMENTATIONS[cls.name] is cls
    assert cls.changes_inputs is True
    assert cls.mixes_targets is (cls in (Mixup, CutMix))


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(TypeError, match=r"augmentation 'mixup' got an unknown option 'beta'; valid options: "
                                        r"alpha, num_classes"):
        Mixup(beta=0.3)


@pytest.mark.parametrize("cls, options, message", [
    (RandomCrop, {"padding": -1}, r"'random_crop': option padding must be an int >= 0"),
    (RandomCrop, {"padding": 2.5}, r"'random_crop': option padding must be an int"),
    (RandomCrop, {"padding": True}, r"'random_crop': option padding must be an int"),
    (RandomCrop, {"mode": "edge"}, r"'random_crop': option mode must be one of \('constant', 'reflect'\)"),
    (Flip, {"p": 1.5}, r"'flip': option p must be a finite number >= 0 and <= 1"),
    (Flip, {"dims": ()}, r"'flip': option dims must be an int or a non-empty tuple"),
    (Flip, {"dims": ("w",)}, r"'flip': option dims must be"),
    (Noise, {"std": -0.1}, r"'noise': option std must be a finite number >= 0"),
    (Noise, {"std": float("nan")}, r"'noise': option std must be a finite number"),
    (Mixup, {"alpha": 0}, r"'mixup': option alpha must be a finite number > 0"),
    (Mixup, {"num_classes": 0}, r"'mixup': option num_classes must be a positive int"),
    (CutMix, {"num_classes": 2.0}, r"'cutmix': option num_classes must be a positive int or None"),
    (TokenMask, {}, r"'token_mask': option mask_id is required"),
    (TokenMask, {"mask_id": 1, "p": -0.1}, r"'token_mask': option p must be a finite number >= 0 and <= 1"),
    (TokenMask, {"mask_id": "[MASK]"}, r"'token_mask': option mask_id must be an int"),
    (TokenMask, {"mask_id": 1, "pad_id": 0.5}, r"'token_mask': option pad_id must be an int or None"),
    (TokenMask, {"mask_id": 1, "special_ids": "[CLS]"}, r"'token_mask': option special_ids must be a list of token ids"),
])
def test_bad_option_values_name_the_option(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls(**options)


def test_config_rebuilds_and_repr():
    aug = Flip(p=0.25, dims=[-2, -1])
    assert aug.config() == {"p": 0.25, "dims": (-2, -1)}
    assert type(aug)(**aug.config()).config() == aug.config()
    assert repr(aug) == "Flip(p=0.25, dims=(-2, -1))"


def test_subclass_contract():
    class Shift(Augmentation):
        name = "shift"
        options = {"by": 1.0}
        changes_inputs = True

        def apply(self, inputs, targets, generator):
            return inputs + self.by * self.uniform((inputs.shape[0], 1), generator, inputs.device), targets

    x = torch.zeros(4, 3)
    out, _ = Shift(by=2.0)(x, None, torch.Generator().manual_seed(0))
    assert out.shape == (4, 3) and bool((out >= 0).all() and (out < 2).all())

    class NoApply(Augmentation):
        name = "no_apply"

    with pytest.raises(NotImplementedError, match="NoApply must implement apply"):
        NoApply()(x, None, torch.Generator())

    with pytest.raises(TypeError, match="option 'apply' would shadow Augmentation.apply"):
        type("Bad", (Augmentation,), {"name": "bad", "options": {"apply": 1}})
    with pytest.raises(TypeError, match="option 'name' would shadow"):
        type("Bad", (Augmentation,), {"name": "bad", "options": {"name": 1}})


def test_compose_applies_in_order_with_one_generator():
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(2))
    augs = [RandomCrop(padding=1), Flip(), Mixup(num_classes=5)]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    out, t = compose(augs, x, y, g1)
    step = (x, y)
    for aug in augs:
        step = aug(*step, g2)
    assert torch.equal(out, step[0]) and torch.equal(t, step[1])
    assert compose([], x, y, g1) == (x, y)


def test_compose_rejects_a_bad_return_value():
    def broken(inputs, targets, generator):
        return inputs

    with pytest.raises(TypeError, match=r"augmentation 'test_compose_rejects_a_bad_return_value.<locals>.broken' "
                                        r"must return \(inputs, targets\), got Tensor"):
        compose([broken], torch.zeros(2, 2), None, torch.Generator())


def test_any_changes_inputs_and_any_mixes_targets():
    class Relabel(Augmentation):
        name = "relabel"
        changes_inputs = False

    def plain(inputs, targets, generator):
        return inputs, targets

    assert not any_changes_inputs([]) and not any_changes_inputs([Relabel()])
    assert any_changes_inputs([Relabel(), Flip()])
    assert any_changes_inputs([plain])  # unknown callables are assumed to change inputs
    assert any_mixes_targets([Flip(), CutMix()]) and not any_mixes_targets([Flip(), plain])
