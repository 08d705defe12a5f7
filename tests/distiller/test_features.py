"""The Distiller's feature integration: request namespacing, extractor lifecycle, lazy adapters and
the optimizer, and the errors for bad paths, shapes, widths and non-finite features."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import distillx as dx
from distillx.distiller import Distiller, NonFiniteLossError
from distillx.features import FeaturePathError, MissingFeatureError
from distillx.methods import FeatureRequest, FeatureShapeError, Method

from distillx.testing import CNN, TinyTransformer, snapshot, unchanged

pytestmark = pytest.mark.filterwarnings("ignore:distillx::")


def data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def pair(seed=0):
    torch.manual_seed(seed)
    return CNN().eval(), CNN((4, 8, 8), downsample=False)


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


class Recorder(Method):
    """Records the dicts it receives; loss: MSE of the students' pooled feature to a constant."""

    name = "recorder"
    options = {"student": "layer3", "teacher": "layer3", "key": "h"}

    def __init__(self, **options):
        super().__init__(**options)
        self.seen = []

    def features(self):
        return [FeatureRequest(self.key, self.student, self.teacher)]

    def loss(self, student, teacher, batch=None):
        self.seen.append({side: {k: (tuple(v.shape), v.requires_grad) for k, v in d.items()}
                          for side, d in (("student", student), ("teacher", teacher))})
        return student[self.key].mean().pow(2)


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_features_are_namespaced_per_method_and_shared_when_identical():
    teacher, student = pair()
    a = Recorder(student="layer2", teacher="layer3", key="h")
    b = Recorder(student="layer3", teacher="layer3", key="h")  # same key, other student layer
    d = Distiller(teacher, student, [a, b], optimizer=adam)
    # the teacher's two requests are identical: captured once
    assert len(d.extractors["student"].specs) == 2 and len(d.extractors["teacher"].specs) == 1
    d.fit([data()], epochs=1)
    assert a.seen[0]["student"]["h"] == ((16, 8, 8, 8), True) and b.seen[0]["student"]["h"] == ((16, 8, 8, 8), True)
    assert a.seen[0]["teacher"]["h"] == ((16, 64, 4, 4), False)
    assert set(a.seen[0]["student"]) == {"logits", "h"}
    c = Recorder(student="layer1", teacher="layer1", key="h")
    Distiller(teacher, student, [a, c], optimizer=adam).fit([data()], epochs=1)
    assert c.seen[0]["student"]["h"][0] == (16, 4, 8, 8) and a.seen[-1]["student"]["h"][0] == (16, 8, 8, 8)


def test_hooks_live_from_construction_to_end_of_fit_or_close():
    teacher, student = pair()
    before = hook_count(teacher), hook_count(student)
    d = Distiller(teacher, student, [dx.method("at", student="layer3", teacher="layer3")])
    assert d.extractors["student"].attached and d.extractors["teacher"].attached
    assert hook_count(teacher) > before[0] and hook_count(student) > before[1]
    d.fit([data()], epochs=1)
    assert (hook_count(teacher), hook_count(student)) == before
    d.fit([data()], epochs=1)  # re-attached for the next fit, removed again
    assert (hook_count(teacher), hook_count(student)) == before
    with Distiller(teacher, student, [dx.method("sp")]) as d2:
        assert hook_count(student) > before[1]
    assert (hook_count(teacher), hook_count(student)) == before
    d2.close()  # idempotent
    assert Distiller(teacher, student, [dx.method("kd")]).extractors == {"student": None, "teacher": None}


def test_lazy_adapters_are_built_before_the_optimizer():
    teacher, student = pair()
    sld = dx.method("sld", student="layer2", teacher="layer3")
    d = Distiller(teacher, student, [sld], optimizer=adam)
    assert d.optimizer is None and sld.needs_setup
    history = d.fit([data()], epochs=3)
    assert not sld.needs_setup and isinstance(sld.adapters["0"][0], nn.Conv2d)
    held = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for p in sld.parameters()) and all(id(p) in held for p in student.parameters())
    assert history[-1]["sld"] < history[0]["sld"]

    # example_inputs: the dry run happens at construction, in eval mode (BatchNorm statistics unchanged)
    teacher, student = pair()
    student_buffers = [b.clone() for b in student.buffers()]
    sld = dx.method("sld", student="layer2", teacher="layer3")
    d = Distiller(teacher, student, [sld], example_inputs=data()[0])
    assert d.optimizer is not None and not sld.needs_setup and student.training
    assert all(torch.equal(a, b) for a, b in zip(student_buffers, student.buffers()))
    assert {id(p) for p in sld.parameters()} <= {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    before = [p.detach().clone() for p in sld.parameters()]
    d.fit([data()], epochs=1)
    assert all(not torch.equal(a, b) for a, b in zip(before, sld.parameters()))


def test_optimizer_instance_cannot_hold_lazy_adapters():
    teacher, student = pair()
    with pytest.raises(ValueError, match="'sld' build their adapters from the first features.*factory"):
        Distiller(teacher, student, [dx.method("sld", student="layer2", teacher="layer3")],
                  optimizer=torch.optim.SGD(student.parameters(), lr=0.1))
    assert hook_count(student) == 0  # the failed construction left no hooks behind
    eager = dx.method("sld", student="layer2", teacher="layer3", adapter="conv", student_width=8, teacher_width=64)
    opt = torch.optim.SGD([*student.parameters(), *eager.parameters()], lr=0.1)
    assert Distiller(teacher, student, [eager], optimizer=opt).optimizer is opt


def test_one_shot_iterator_keeps_its_first_batch():
    teacher, student = pair()
    rec = Recorder()
    sld = dx.method("sld", student="layer2", teacher="layer3")
    Distiller(teacher, student, [sld, rec]).fit(iter([data(seed=1), data(seed=2)]), epochs=1)
    assert len(rec.seen) == 2  # both batches trained on; the dry run calls setup(), not loss()


# -- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side, options", [
    ("student", {"student": "layer9", "teacher": "layer3"}),
    ("teacher", {"student": "layer3", "teacher": "layer3.7"}),
])
def test_unknown_layer_names_method_and_layer(side, options):
    teacher, student = pair()
    path = options[side]
    with pytest.raises(FeaturePathError, match=rf"method 'at', feature 'pair0': unknown {side} layer '{path}'"):
        Distiller(teacher, student, [dx.method("kd"), dx.method("at", **options)])
    assert hook_count(student) == 0 and hook_count(teacher) == 0


def test_reserved_and_duplicate_keys():
    teacher, student = pair()
    with pytest.raises(ValueError, match="'logits' is reserved"):
        Distiller(teacher, student, [Recorder(key="logits")])


def test_unusable_shape_names_method_and_layer():
    teacher, student = pair()
    before = [p.detach().clone() for p in student.parameters()]
    at = dx.method("at", student="fc@input", teacher="layer3")
    with pytest.raises(FeatureShapeError, match=r"method 'at': feature 'pair0' \(student layer 'fc@input'\): .*"
                                                r"shape \(16, 8\).*\(B, C, H, W\)"):
        Distiller(teacher, student, [at]).fit([data()], epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))  # no optimizer step
    assert hook_count(student) == 0


def test_tinybert_head_mismatch_names_both():
    torch.manual_seed(0)
    teacher, student = TinyTransformer(32, 4, 3).eval(), TinyTransformer(16, 2, 2)
    m = dx.method("tinybert_attn", student_scores="encoder.layers.1.self_attn:1",
                  teacher_scores="encoder.layers.2.self_attn:1")
    x, y = torch.randn(4, 6, 8), torch.randint(0, 5, (4,))
    with pytest.raises(FeatureShapeError, match=r"student layer 'encoder.layers.1.self_attn:1', teacher layer "
                                                r"'encoder.layers.2.self_attn:1'.*student has 2 heads and the "
                                                r"teacher 4"):
        Distiller(teacher, student, [m]).fit([(x, y)], epochs=1)


class NaNAfter(nn.Module):
    def forward(self, x):
        return x * float("nan")


def test_nan_feature_names_model_layer_and_method():
    teacher, student = pair()
    teacher.layer2.append(NaNAfter())
    before = [p.detach().clone() for p in student.parameters()]
    d = Distiller(teacher, student, [dx.method("sp", student="layer2", teacher="layer2")], task_weight=0.0)
    with pytest.raises(NonFiniteLossError, match=r"method 'sp': its loss is nan; the teacher feature 'pair0' captured "
                                                 r"at teacher layer 'layer2' holds NaN/inf"):
        d.fit([data()], epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))  # stopped before the step
    Distiller(teacher, student, [dx.method("sp", student="layer2", teacher="layer2")], task_weight=0.0,
              check_finite=False).fit([data()], epochs=1)  # the check can be switched off


def test_feature_of_a_module_that_did_not_run_names_method():
    class Skips(CNN):
        def forward(self, x):
            return self.fc(self.pool(self.layer2(self.layer1(x))).flatten(1)[:, :64])

    torch.manual_seed(0)
    teacher = Skips((16, 64, 64)).eval()
    with pytest.raises(MissingFeatureError, match=r"teacher model: not captured.*Needed by: method 'kfd' "
                                                  r"\(feature 'pair0', teacher layer 'layer3'\)"):
        Distiller(teacher, CNN((4, 8, 8)), [dx.method("kfd", student="layer3", teacher="layer3")]).fit(
            [data()], epochs=1)


def test_gradients_reach_student_and_adapters_not_teacher():
    teacher, student = pair()
    before = snapshot(teacher)
    methods = [dx.method("sld", student="layer3", teacher="layer3"), dx.method("at", student="layer2", teacher="layer2"),
               dx.method("kfd"), dx.method("kd")]
    d = Distiller(teacher, student, methods, task_weight=0.0, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    d.fit([data()], epochs=1)
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in methods[0].parameters())
    assert all(p.grad is None for p in teacher.parameters()) and unchanged(teacher, before)


class Reduced(Method):
    """Requests with select / reduction / reduction_kwargs, per-side select."""

    name = "reduced"

    def features(self):
        return [FeatureRequest("att", "layer3", "layer3", reduction="attention_map", reduction_kwargs={"p": 4}),
                FeatureRequest("scores", "encoder.layers.1.self_attn", "encoder.layers.2.self_attn", select=1),
                FeatureRequest("ctx", "encoder.layers.0.self_attn", "encoder.layers.0.self_attn",
                               student_select=0, teacher_select=1)]

    def loss(self, student, teacher, batch=None):
        self.shapes = {k: (tuple(student[k].shape), tuple(teacher[k].shape)) for k in ("att", "scores", "ctx")}
        return student["att"].sum() * 0 + student["scores"].mean() * 0 + student["ctx"].pow(2).mean()


def test_requests_with_select_and_reductions():
    class Both(nn.Module):  # a conv trunk and a transformer in one model, to exercise every request at once
        def __init__(self, widths, dim, heads):
            super().__init__()
            self.cnn, self.tr = CNN(widths, classes=5), TinyTransformer(dim, heads, depth=3)
            self.layer3, self.encoder = self.cnn.layer3, self.tr.encoder

        def forward(self, images, tokens):  # tuple inputs are passed as model(*inputs)
            return self.cnn(images) + self.tr(tokens)

    torch.manual_seed(0)
    teacher, student = Both((16, 32, 64), 32, 4).eval(), Both((4, 8, 8), 16, 2)
    m = Reduced()
    x = torch.rand(4, 1, 8, 8), torch.randn(4, 6, 8)
    d = Distiller(teacher, student, [m])  # (run one step's forward by hand)
    s_out, s_feats, t_out, t_feats = d._step.forward(x)
    s, t = d._plan.views(0, s_out, s_feats, t_out, t_feats)
    m.loss(s, t)
    d.close()
    assert m.shapes == {"att": ((4, 16), (4, 16)),           # (B, H*W) attention maps, reduced at capture
                        "scores": ((4, 2, 6, 6), (4, 4, 6, 6)),
                        "ctx": ((4, 6, 16), (4, 4, 6, 6))}
