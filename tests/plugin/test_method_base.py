"""The Method base class: options, validation, features, extra parameters."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distillx.methods import FeatureRequest, Method
from distillx.methods.base import check_method_class


class Scaled(Method):
    name = "scaled"
    options = {"scale": 2.0, "mode": "a"}

    def validate(self):
        self.check_number("scale", gt=0)
        self.check_choice("mode", ("a", "b"))

    def loss(self, student, teacher, batch=None):
        return self.scale * (self.require(student, "logits", "student") - teacher["logits"]).pow(2).mean()


class MoreScaled(Scaled):
    name = "more_scaled"
    options = {"extra": 1}


class WithAdapter(Method):
    name = "with_adapter"
    options = {"width": 3}

    def __init__(self, **options):
        super().__init__(**options)
        self.adapter = nn.Linear(self.width, 2)

    def features(self):
        return [FeatureRequest("hint", student="layer1", teacher="layer3")]


def test_options_become_attributes_with_defaults():
    m = Scaled(scale=3.0)
    assert (m.scale, m.mode, m.weight) == (3.0, "a", 1.0)
    assert m.config() == {"weight": 1.0, "scale": 3.0, "mode": "a"}
    assert Scaled(**m.config()).config() == m.config()
    assert "scale=3.0" in repr(m)


def test_options_are_inherited():
    assert MoreScaled.default_options() == {"weight": 1.0, "scale": 2.0, "mode": "a", "extra": 1}
    assert MoreScaled(extra=5, mode="b").extra == 5


def test_unknown_option_names_it_and_the_valid_ones():
    with pytest.raises(TypeError) as err:
        Scaled(scael=1.0)
    assert "'scael'" in str(err.value) and "mode, scale, weight" in str(err.value)


@pytest.mark.parametrize("weight", [-0.1, float("nan"), float("inf"), "1", True, None])
def test_weight_must_be_a_finite_non_negative_number(weight):
    with pytest.raises(ValueError, match="option weight"):
        Scaled(weight=weight)


def test_zero_weight_is_allowed():
    assert Scaled(weight=0).weight == 0


def test_validate_runs_on_construction():
    with pytest.raises(ValueError, match=r"option scale must be a finite number > 0, got -1"):
        Scaled(scale=-1)
    with pytest.raises(ValueError, match=r"option mode must be one of \('a', 'b'\), got 'c'"):
        Scaled(mode="c")


@pytest.mark.parametrize("bad", ["loss", "training", "parameters", "_private", "not-an-identifier"])
def test_option_names_cannot_shadow_module_attributes(bad):
    with pytest.raises(TypeError, match="option"):
        type("Bad", (Method,), {"name": "bad", "options": {bad: 1}})


def test_logit_methods_need_no_features_and_have_no_parameters():
    m = Scaled()
    assert m.features() == [] and list(m.parameters()) == []
    s, t = torch.ones(2, 3), torch.zeros(2, 3)
    assert m({"logits": s}, {"logits": t}).item() == pytest.approx(2.0)  # forward == unweighted loss


def test_adapters_are_trainable_parameters():
    m = WithAdapter(width=4)
    assert [p.shape for p in m.parameters()] == [torch.Size([2, 4]), torch.Size([2])]
    assert m.features()[0] == FeatureRequest("hint", "layer1", "layer3", "output", None)
    assert "adapter." + "weight" in m.state_dict()


def test_loss_must_be_implemented():
    with pytest.raises(NotImplementedError, match="WithAdapter must implement loss"):
        WithAdapter().loss({}, {}, None)


def test_missing_output_names_method_side_and_key():
    with pytest.raises(KeyError, match=r"'scaled' needs student\['logits'\].*'feats'"):
        Scaled()({"feats": 1}, {"logits": 1})


@pytest.mark.parametrize("kwargs, field", [
    (dict(key="", student="a", teacher="b"), "key"),
    (dict(key="k", student=None, teacher="b"), "student"),
    (dict(key="k", student="a", teacher="b", capture="both"), "capture"),
    (dict(key="k", student="a", teacher="b", reduction=""), "reduction"),
])
def test_feature_request_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"FeatureRequest.{field}"):
        FeatureRequest(**kwargs)


def test_feature_request_input_capture():
    req = FeatureRequest("pen", "fc", "head.fc", capture="input", reduction="attention_map")
    assert (req.capture, req.reduction) == ("input", "attention_map")


def test_method_registry_check():
    check_method_class("scaled", Scaled)
    with pytest.raises(TypeError, match="subclass of distillx.methods.Method"):
        check_method_class("scaled", Scaled())
    with pytest.raises(TypeError, match="subclass"):
        check_method_class("f", lambda: None)
    with pytest.raises(ValueError, match="has name 'scaled' but is registered as 'other'"):
        check_method_class("other", Scaled)
