"""Registration through the plugin layer, build()/resolve(), and third-party augmentations."""
from __future__ import annotations

import re
import types

import pytest
import torch

from distillx import augment
from distillx.augment import Augmentation, Mixup, compose
from distillx.cli import plugins as plugins_cli
from distillx.plugin import augmentation as build, resolve_augmentation as resolve
from distillx.plugin import DuplicateNameError, UnknownNameError, get_plugin_manager, get_registries, hookimpl

NAMES = ["cutmix", "flip", "mixup", "noise", "random_crop", "token_mask"]


def test_builtins_are_registered_by_the_augment_plugin():
    regs = get_registries().augmentations
    assert regs.names() == NAMES
    for name in NAMES:
        entry = regs.entry(name)
        assert entry.provider == "distillx.augment" and entry.obj is augment.BUILTIN_AUGMENTATIONS[name]
    pm = get_plugin_manager()
    assert pm.get_plugin("distillx.augment").module == "distillx.augment"
    assert pm.plugin_info["distillx.augment"].source == "builtin"
    assert pm.failed == []


def test_distillx_plugins_lists_them(capsys):
    assert plugins_cli.main([]) == 0
    out = capsys.readouterr().out
    section = out.split("augmentations:\n", 1)[1]
    for name in NAMES:
        assert re.search(rf"^  {name}\s+distillx\.augment \(built-in\)$", section, re.M), out


def test_build_and_resolve():
    aug = build("mixup", alpha=0.4, num_classes=10)
    assert isinstance(aug, Mixup) and aug.config() == {"alpha": 0.4, "num_classes": 10}
    with pytest.raises(TypeError, match="augmentation 'flip' got an unknown option 'prob'"):
        build("flip", prob=0.3)
    with pytest.raises(UnknownNameError, match="unknown augmentation 'mixupp'; registered augmentations: 'cutmix'"):
        build("mixupp")
    assert resolve("flip").config() == {"p": 0.5, "dims": (-1,)}
    assert resolve({"name": "noise", "std": 0.2}).std == 0.2
    fn = lambda x, y, g: (x, y)  # noqa: E731
    assert resolve(fn) is fn
    with pytest.raises(ValueError, match="needs a 'name' string"):
        resolve({"std": 0.2})
    with pytest.raises(TypeError, match="must be a registered name"):
        resolve(3)


class Invert(Augmentation):
    """1 - x with probability p per sample."""

    name = "invert"
    options = {"p": 0.5}

    def validate(self):
        self.check_number("p", ge=0, le=1)

    def apply(self, inputs, targets, generator):
        x = self.require_tensor(inputs, "inputs", "(N, ...) floating-point", floating=True, min_ndim=1)
        hit = self.uniform((x.shape[0],), generator, x.device) < self.p
        return torch.where(hit.view(-1, *[1] * (x.dim() - 1)), 1 - x, x), targets


def _module_plugin() -> types.ModuleType:
    mod = types.ModuleType("my_augment_plugin")

    @hookimpl
    def distillx_register_augmentations(registry):
        registry.add(Invert.name, Invert)
        # a plain factory: (**options) -> (inputs, targets, generator) -> (inputs, targets)
        registry.add("scale", lambda factor=2.0: (lambda x, y, g: (x * factor, y)))
        registry.add("fixed_noise", augment.Noise(std=0.0))  # an instance

    mod.distillx_register_augmentations = distillx_register_augmentations
    return mod


def test_third_party_augmentation_registered_at_run_time():
    pm = get_plugin_manager()
    assert pm.register(_module_plugin(), "my-augments") == "my-augments"
    regs = get_registries().augmentations
    assert {regs.provider(n) for n in ("invert", "scale", "fixed_noise")} == {"my-augments"}
    x = torch.rand(6, 4)
    inverted, _ = build("invert", p=1.0)(x, None, torch.Generator())
    assert torch.allclose(inverted, 1 - x)
    scale = build("scale", factor=3.0)
    out, y = compose([build("invert", p=0.0), scale], x, "labels", torch.Generator())
    assert torch.allclose(out, 3 * x) and y == "labels"
    assert augment.any_changes_inputs([scale])
    assert build("fixed_noise") is regs.get("fixed_noise")
    assert build("fixed_noise", std=0.5).std == 0.5


def test_factory_returning_a_non_callable_is_an_error():
    class Plugin:
        @hookimpl
        def distillx_register_augmentations(self, registry):
            registry.add("broken", lambda: 42)

    get_plugin_manager().register(Plugin(), "broken-augments")
    with pytest.raises(TypeError, match=r"augmentation 'broken' \(plugin 'broken-augments'\) built a int"):
        build("broken")


def test_taking_a_builtin_name_needs_override():
    class Clash:
        @hookimpl
        def distillx_register_augmentations(self, registry):
            registry.add("flip", Invert)

    with pytest.raises(DuplicateNameError, match="'flip' is already provided by plugin 'distillx.augment'"):
        get_plugin_manager().register(Clash(), "clash")

    class Override:
        @hookimpl
        def distillx_register_augmentations(self, registry):
            registry.add("flip", Invert, override=True)

    get_plugin_manager().register(Override(), "override")
    entry = get_registries().augmentations.entry("flip")
    assert entry.provider == "override" and entry.overrides == "distillx.augment"
    assert isinstance(build("flip"), Invert)
