"""Capturing: input vs output, selection, lifecycle, grad/no-grad, requests and the shorthand."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distillx.features import (PENULTIMATE, FeatureCaptureError, FeatureExtractor, FeatureSpec,
                               MissingFeatureError)
from distillx.features.extractor import _PerDevice
from distillx.methods.base import FeatureRequest

from .models import MultiOut, TinyBert, all_hooks, mlp


def test_input_and_output_capture():
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(4, 6)
    with FeatureExtractor(model, [FeatureSpec("2", capture="input"), FeatureSpec("2")]) as ex:
        model(x)
    hidden = torch.relu(model[0](x))
    torch.testing.assert_close(ex["2@input"], hidden)
    torch.testing.assert_close(ex["2"], model[2](hidden))
    assert list(ex.features) == ["2@input", "2"]  # FeatureSpec("2", capture="input") has key "2@input"


def test_input_capture_by_argument_name_keyword_or_positional():
    torch.manual_seed(0)
    bert = TinyBert()
    x, mask = torch.randn(2, 4, 8), torch.randn(2, 4, 4)
    specs = {"kw": "encoder.layer.0.attention.self@input:attention_mask",  # passed by keyword
             "pos": "encoder.layer.0.attention.self@input:hidden_states",  # passed positionally
             "idx": "encoder.layer.0.attention.self@input:1"}               # positional index 1
    with FeatureExtractor(bert, specs) as ex:
        bert(x, attention_mask=mask)
        assert ex["kw"] is mask
        assert ex["pos"] is x
        assert ex["idx"] is mask  # Attention.forward calls self.self(x, attention_mask) positionally
    with FeatureExtractor(bert, {"kw": specs["kw"]}) as ex, pytest.raises(
            FeatureCaptureError, match="argument 'attention_mask' was not passed"):
        bert.encoder.layer[0].attention.self(x)


@pytest.mark.parametrize("path, expected", [
    ("tup:0", lambda x: x + 1), ("tup:-1", lambda x: x * 2),
    ("dct:b", lambda x: x * 3),
    ("nt:aux", lambda x: x * 7), ("nt:0", lambda x: x * 5),
    ("dc:scores", lambda x: x * 13),
    ("nested:1:0", lambda x: x * 17), ("nested:1:1:deep", lambda x: x * 19),
])
def test_structured_output_selection(path, expected):
    model, x = MultiOut(), torch.randn(3, 2)
    with FeatureExtractor(model, [path]) as ex:
        model(x)
    torch.testing.assert_close(ex[path], expected(x))


def test_unselected_structured_output_is_stored_whole_and_bad_selects_fail_clearly():
    model, x = MultiOut(), torch.randn(3, 2)
    with FeatureExtractor(model, ["dct"]) as ex:
        model(x)
    assert set(ex["dct"]) == {"a", "b"}
    with FeatureExtractor(model, ["dct:c"], name="teacher") as ex, pytest.raises(
            FeatureCaptureError, match=r"teacher model.*cannot apply select='c' to a dict with keys 'a', 'b'"):
        model(x)
    with FeatureExtractor(model, ["tup:2"]) as ex, pytest.raises(FeatureCaptureError, match="tuple of length 2"):
        model(x)
    # a string picks a field, never an attribute such as tuple.count
    with FeatureExtractor(model, ["tup:count"]) as ex, pytest.raises(FeatureCaptureError, match="select='count'"):
        model(x)
    with FeatureExtractor(model, ["nt:count"]) as ex, pytest.raises(
            FeatureCaptureError, match="select='count' to a Pair \\(namedtuple\\) with fields main, aux"):
        model(x)
    # select never indexes into a tensor (that would silently pick a sample)
    with FeatureExtractor(model, ["tup:0:1"]) as ex, pytest.raises(FeatureCaptureError, match="never indexes a tensor"):
        model(x)
    # a reduction on a tuple output asks for a selection
    with FeatureExtractor(model, [FeatureSpec("tup", reduction="l2_normalize")]) as ex, pytest.raises(
            FeatureCaptureError, match=r"reduction 'l2_normalize' failed on a tuple of length 2.*select="):
        model(x)


def test_hooks_are_removed_on_exit_close_and_error():
    model = TinyBert()
    wrapped = nn.DataParallel(model)
    reqs = ["encoder.layer.0", "encoder.layer.1.attention.self@input", PENULTIMATE]
    x = torch.randn(2, 4, 8)
    ex = FeatureExtractor(wrapped, reqs)
    with ex:
        assert all_hooks(wrapped) > 0
        wrapped(x)
    assert all_hooks(wrapped) == 0 and not ex.attached
    ex.attach()
    assert ex.attached and all_hooks(wrapped) > 0
    ex.close()
    assert all_hooks(wrapped) == 0
    with pytest.raises(ZeroDivisionError), ex:
        1 / 0
    assert all_hooks(wrapped) == 0
    # a capture error inside the forward also leaves no hook behind
    with pytest.raises(FeatureCaptureError), FeatureExtractor(model, ["encoder.layer.0:1"]):
        model(x)
    assert all_hooks(model) == 0


def test_reuse_nesting_and_features_after_exit():
    torch.manual_seed(0)
    model = mlp()
    x1, x2 = torch.randn(2, 6), torch.randn(2, 6)
    ex = FeatureExtractor(model, ["0"])
    with ex:
        with ex:  # nested use keeps the hooks until the outermost exit
            model(x1)
        assert ex.attached and all_hooks(model) > 0
        model(x2)
    torch.testing.assert_close(ex["0"], model[0](x2))  # readable after exit
    model(x1)
    torch.testing.assert_close(ex["0"], model[0](x2))  # not updated while detached
    with ex:
        assert ex.features == {}  # attaching starts fresh
        model(x1)
    torch.testing.assert_close(ex["0"], model[0](x1))
    ex.clear()
    with pytest.raises(MissingFeatureError, match=r"not captured: feature '0' \(output of '0'\).*not attached"):
        ex["0"]


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x, use_b=True):
        x = self.a(x)
        return self.b(x) if use_b else x


def test_features_are_cleared_between_forward_passes():
    model, x = Branchy(), torch.randn(2, 3)
    with FeatureExtractor(model, ["a", "b"]) as ex:
        model(x)
        assert set(ex.features) == {"a", "b"}
        model(x, use_b=False)
        assert set(ex.features) == {"a"}  # no stale "b" from the previous pass
        with pytest.raises(MissingFeatureError, match=r"feature 'b' \(output of 'b'\).*did not run"):
            ex.collect()
        assert set(ex.collect(strict=False)) == {"a"}
    with FeatureExtractor(model, ["a", "b"], clear_on_forward=False) as ex:
        model(x)
        model(x, use_b=False)
        assert set(ex.features) == {"a", "b"}
    with pytest.raises(KeyError, match="no feature 'c' was requested; requested: 'a', 'b'"):
        ex["c"]


def test_student_capture_keeps_the_graph_and_teacher_capture_is_detached():
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(4, 6)
    spec = FeatureSpec("2", reduction="l2_normalize")
    with FeatureExtractor(model, {"f": spec, "raw": "2"}) as student:
        model(x)
    feat = student["f"]
    assert feat.requires_grad and student["raw"].requires_grad
    feat.sum().backward()
    # the gradient reached the first layer through the reduction and the captured feature
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    model.zero_grad()
    with FeatureExtractor(model, {"f": spec, "raw": "2"}, no_grad=True) as teacher:
        model(x)
    assert not teacher["f"].requires_grad and not teacher["raw"].requires_grad
    assert teacher["f"].grad_fn is None
    torch.testing.assert_close(teacher["f"], feat.detach())
    with FeatureExtractor(model, ["2"], detach=True) as ex:
        model(x)
    assert not ex["2"].requires_grad


def test_capture_in_inference_mode():
    torch.manual_seed(0)
    model = mlp().eval()
    x = torch.randn(4, 6)
    specs = {"raw": "2", "in": "4@input", "at": FeatureSpec("2", reduction="l2_normalize"),
             "pen": PENULTIMATE}
    with FeatureExtractor(model, specs, no_grad=True) as ex, torch.inference_mode():
        model(x)
        feats = ex.collect()
    expected_in = torch.tanh(model[2](torch.relu(model[0](x)))).detach()
    torch.testing.assert_close(feats["in"], expected_in)
    torch.testing.assert_close(feats["pen"], expected_in)
    torch.testing.assert_close(feats["at"], nn.functional.normalize(model[2](torch.relu(model[0](x))), dim=1))
    assert all(t.is_inference() and not t.requires_grad for t in feats.values())
    # read outside inference mode, they become normal tensors a student loss can be differentiated against
    student = torch.randn(4, 5, requires_grad=True)
    normal = ex["in"]
    assert not normal.is_inference() and ex["in"] is normal
    torch.testing.assert_close(normal, expected_in)
    nn.functional.mse_loss(student, normal).backward()
    torch.testing.assert_close(student.grad, 2 * (student - expected_in).detach() / student.numel())


class InplaceAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.lin(x))


def test_in_place_modification_after_capture_is_detected_and_clone_fixes_it():
    torch.manual_seed(0)
    model, x = InplaceAfter(), torch.randn(8, 3)
    pre_relu = model.lin(x).detach()
    assert (pre_relu < 0).any()
    with FeatureExtractor(model, ["lin"]) as ex:
        model(x)
    with pytest.raises(FeatureCaptureError, match=r"feature 'lin' \(output of 'lin'\) was modified in place"):
        ex["lin"]
    with FeatureExtractor(model, ["lin"], clone=True) as ex:
        model(x)
    torch.testing.assert_close(ex["lin"], pre_relu)
    # a reduction runs inside the hook, before the in-place op: no copy needed
    with FeatureExtractor(model, [FeatureSpec("lin", reduction="l2_normalize")]) as ex:
        model(x)
    torch.testing.assert_close(ex["lin"], nn.functional.normalize(pre_relu, dim=1))


def test_feature_requests_translate_per_side():
    torch.manual_seed(0)
    student, teacher = mlp(hidden=4), mlp(hidden=7)
    reqs = [FeatureRequest("hint", student="2", teacher="-3", reduction="l2_normalize"),
            FeatureRequest("pen", student=PENULTIMATE, teacher="4", capture="input")]
    s_ex = FeatureExtractor.from_requests(student, reqs, "student")
    t_ex = FeatureExtractor.from_requests(teacher, reqs, "teacher")
    assert t_ex.name == "teacher" and t_ex.detach and not s_ex.detach
    x = torch.randn(3, 6)
    with s_ex, t_ex:
        student(x)
        with torch.no_grad():
            teacher(x)
    assert s_ex.paths == {"hint": "2", "pen": "4"} and t_ex.paths == {"hint": "2", "pen": "4"}
    torch.testing.assert_close(s_ex["hint"], nn.functional.normalize(student[2](torch.relu(student[0](x))), dim=1))
    assert s_ex["pen"].shape == (3, 4) and t_ex["pen"].shape == (3, 7)
    assert s_ex["hint"].requires_grad and not t_ex["hint"].requires_grad
    with pytest.raises(TypeError, match="give the extractor name='student' or name='teacher'"):
        FeatureExtractor(student, reqs)


def test_shorthand_parsing():
    assert FeatureSpec.parse("blocks.-1") == FeatureSpec("blocks.-1")
    assert FeatureSpec.parse("a.b:1") == FeatureSpec("a.b", select=1)
    assert FeatureSpec.parse("a.b:-2") == FeatureSpec("a.b", select=-2)
    assert FeatureSpec.parse("a@input:mask") == FeatureSpec("a", capture="input", select="mask")
    assert FeatureSpec.parse("a:1:x") == FeatureSpec("a", select=(1, "x"))
    assert FeatureSpec.parse("a@output", reduction="l2_normalize").reduction == "l2_normalize"
    assert FeatureSpec("a", capture="input", select=(0, "k")).shorthand == "a@input:0:k"
    assert FeatureSpec(PENULTIMATE).capture == "input"
    with pytest.raises(ValueError, match="'@inptu' must be one of @output, @input"):
        FeatureSpec.parse("a@inptu")
    with pytest.raises(ValueError, match="says capture='output' but capture='input'"):
        FeatureSpec.parse("a@output", capture="input")
    with pytest.raises(ValueError, match="empty selector"):
        FeatureSpec.parse("a:")


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown reduction 'attn_map'; built-in reductions: attention_map"):
        FeatureSpec("a", reduction="attn_map")
    with pytest.raises(ValueError, match=r"bad reduction_kwargs \{'q': 2\}.*its options: p, channel_dim, size, eps"):
        FeatureSpec("a", reduction="attention_map", reduction_kwargs={"q": 2})
    with pytest.raises(ValueError, match="reduction_kwargs given without a reduction"):
        FeatureSpec("a", reduction_kwargs={"p": 2})
    with pytest.raises(ValueError, match="capture must be one of"):
        FeatureSpec("a", capture="grad")
    with pytest.raises(TypeError, match="select must be an int index"):
        FeatureSpec("a", select=True)
    # specs are hashable even with reduction options
    assert len({FeatureSpec("a", reduction="attention_map", reduction_kwargs={"p": 3})}) == 1


def test_duplicate_keys_and_bad_requests_are_rejected():
    model = mlp()
    with pytest.raises(ValueError, match="two features share the key '0'"):
        FeatureExtractor(model, ["0", FeatureSpec("1", key="0")])
    with pytest.raises(TypeError, match="must be a string, a FeatureSpec or a FeatureRequest"):
        FeatureExtractor(model, [3])
    ex = FeatureExtractor(model, {"first": "0", "last": FeatureSpec("-1", key="ignored")})
    assert ex.paths == {"first": "0", "last": "4"}  # mapping keys win


def test_dataparallel_replica_chunks_are_gathered_in_device_order():
    # What multi-GPU DataParallel does: each replica's hook stores its chunk; reading concatenates
    # them along DataParallel.dim in device_ids order.
    model = mlp()
    ex = FeatureExtractor(model, ["0", FeatureSpec("2", reduction="channel_stats")])
    ex._gather = (0, [1, 0], None)
    ex._captured["0"] = _PerDevice({0: torch.ones(2, 5), 1: torch.zeros(3, 5)})
    merged = ex["0"]
    assert merged.shape == (5, 5) and merged[:3].eq(0).all() and merged[3:].eq(1).all()
    ex._captured["2"] = _PerDevice({0: (torch.ones(5), torch.ones(5)), 1: (torch.ones(5), torch.ones(5))})
    with pytest.raises(FeatureCaptureError, match="only tensor features can be gathered"):
        ex["2"]
