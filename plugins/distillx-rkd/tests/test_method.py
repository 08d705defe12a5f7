"""The ``rkd`` Method: options, the features it asks for, its loss through the Method interface, and errors."""
from __future__ import annotations

import pytest
import torch

import rkd_paper_reference as paper
from distillx.methods import FeatureRequest, FeatureShapeError
from distillx_rkd import RKD


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- options ----------------------------------------------------------------------------------
def test_defaults_are_the_papers():
    m = RKD()
    assert m.config() == {"weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0, "feature": "penultimate",
                          "student": None, "teacher": None}
    assert m.features() == [FeatureRequest("pair0", "penultimate", "penultimate")]
    assert list(m.parameters()) == []  # relations are width-free: no adapter
    rebuilt = RKD(**RKD(distance_weight=1.0, student="fc1").config())
    assert rebuilt.config()["distance_weight"] == 1.0 and rebuilt.features()[0].student == "fc1"


def test_layer_paths_override_the_feature():
    assert RKD(student="0", teacher="2").features() == [FeatureRequest("pair0", "0", "2")]
    assert RKD(student="body.fc").features() == [FeatureRequest("pair0", "body.fc", "penultimate")]
    assert RKD(student=["a", "b"], teacher=["c", "d"]).features() == [
        FeatureRequest("pair0", "a", "c"), FeatureRequest("pair1", "b", "d")]
    assert RKD(feature="logits").features() == []


@pytest.mark.parametrize("options, error, match", [
    ({"distance_wieght": 1.0}, TypeError, "unknown option 'distance_wieght'.*distance_weight"),
    ({"distance_weight": -1.0}, ValueError, "'rkd': option distance_weight must be a finite number >= 0"),
    ({"angle_weight": float("nan")}, ValueError, "'rkd': option angle_weight must be a finite number"),
    ({"angle_weight": True}, ValueError, "option angle_weight must be a finite number"),
    ({"distance_weight": 0, "angle_weight": 0}, ValueError, "both 0"),
    ({"weight": -0.5}, ValueError, "option weight must be a finite number >= 0"),
    ({"feature": "embedding"}, ValueError, "option feature must be one of \\('penultimate', 'logits'\\)"),
    ({"feature": "logits", "student": "fc1"}, ValueError, "feature='logits'.*no student/teacher layer paths"),
    ({"student": ["a", "b"], "teacher": "c"}, ValueError, "same number of layers"),
    ({"student": ""}, ValueError, "option student must be a non-empty layer path"),
])
def test_bad_options_fail_at_construction(options, error, match):
    with pytest.raises(error, match=match):
        RKD(**options)


# -- loss -------------------------------------------------------------------------------------
def test_loss_is_weighted_paper_loss_per_pair():
    s0, t0 = randn(6, 4, seed=0), randn(6, 10, seed=1)
    s1, t1 = randn(6, 3, 2, seed=2), randn(6, 5, seed=3)
    m = RKD(student=["a", "b"], teacher=["c", "d"], distance_weight=2.0, angle_weight=3.0)
    out = m({"logits": None, "pair0": s0, "pair1": s1}, {"logits": None, "pair0": t0, "pair1": t1})
    expected = sum(2.0 * paper.distance_loss(s, t) + 3.0 * paper.angle_loss(s, t)
                   for s, t in ((s0, t0), (s1, t1)))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_logits_feature_uses_the_outputs():
    s, t = randn(5, 10, seed=4), randn(5, 10, seed=5)
    out = RKD(feature="logits", angle_weight=0.0)({"logits": s}, {"logits": t})
    torch.testing.assert_close(out, 25.0 * paper.distance_loss(s, t), rtol=1e-10, atol=1e-12)


def test_weight_is_not_applied_by_the_method():
    s, t = randn(5, 4, seed=6), randn(5, 4, seed=7)
    a = RKD(weight=0.25)({"pair0": s}, {"pair0": t})
    b = RKD()({"pair0": s}, {"pair0": t})
    torch.testing.assert_close(a, b)  # the Distiller multiplies by weight


# -- bad inputs -------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2])
def test_too_small_batch_is_a_clear_error(n):
    m = RKD(student="fc1", teacher="fc2")
    with pytest.raises(FeatureShapeError, match=(
            rf"method 'rkd': feature 'pair0' \(student layer 'fc1', teacher layer 'fc2'\): relational distillation "
            rf"needs at least 3 samples per batch, got a batch of {n} .*drop_last=True")):
        m({"pair0": torch.randn(n, 4)}, {"pair0": torch.randn(n, 6)})


def test_too_small_batch_of_logits():
    with pytest.raises(FeatureShapeError, match="method 'rkd': feature 'logits': .*got a batch of 1"):
        RKD(feature="logits")({"logits": torch.randn(1, 10)}, {"logits": torch.randn(1, 10)})


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_nan_feature_names_method_and_side(side):
    feats = {"student": {"pair0": torch.randn(4, 3)}, "teacher": {"pair0": torch.randn(4, 5)}}
    feats[side]["pair0"][2, 1] = float("nan")
    with pytest.raises(FeatureShapeError, match=(rf"method 'rkd': feature 'pair0' \({side} layer 'penultimate'\): "
                                                 rf"the {side} feature holds NaN/inf")):
        RKD()(feats["student"], feats["teacher"])


def test_inf_feature_is_reported_too():
    s = torch.randn(4, 3)
    s[0, 0] = float("inf")
    with pytest.raises(FeatureShapeError, match="student feature holds NaN/inf"):
        RKD()({"pair0": s}, {"pair0": torch.randn(4, 3)})


def test_shape_and_key_errors():
    m = RKD()
    with pytest.raises(FeatureShapeError, match="student batch 4 != teacher batch 5"):
        m({"pair0": torch.randn(4, 3)}, {"pair0": torch.randn(5, 3)})
    with pytest.raises(FeatureShapeError, match="the teacher feature has shape \\(4,\\); .*at least 2 dims"):
        m({"pair0": torch.randn(4, 3)}, {"pair0": torch.randn(4)})
    with pytest.raises(FeatureShapeError, match="must be a floating-point tensor, got a torch.int64"):
        m({"pair0": torch.ones(4, 3, dtype=torch.long)}, {"pair0": torch.randn(4, 3)})
    with pytest.raises(KeyError, match="method 'rkd' needs teacher\\['pair0'\\]"):
        m({"pair0": torch.randn(4, 3)}, {"logits": torch.randn(4, 3)})
