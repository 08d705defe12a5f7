"""Each feature method's loss on small inputs against a direct computation, option validation,
shape errors naming method and layer, and gradients reaching the student side (and adapters) only."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distillx as dx
from distillx.features import PENULTIMATE as FEATURES_PENULTIMATE
from distillx.methods import KFD, FeatureRequest, FeatureShapeError
from distillx.methods.base import PENULTIMATE

pytestmark = pytest.mark.filterwarnings("ignore:distillx")  # "running the reference" notices


def feats(**kw):
    return {"logits": torch.zeros(1), **kw}


def leaf(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()


def const(*shape, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def test_penultimate_constants_agree():
    assert PENULTIMATE == FEATURES_PENULTIMATE


# -- sld -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s_shape, t_shape, kind", [
    ((4, 6), (4, 10), nn.Linear),
    ((4, 5, 6), (4, 5, 10), nn.Linear),
    ((4, 3, 4, 4), (4, 7, 4, 4), nn.Sequential),
])
def test_sld_matches_mse_through_adapter(s_shape, t_shape, kind):
    m = dx.method("sld", student="a", teacher="b")
    s, t = leaf(*s_shape), const(*t_shape)
    assert m.needs_setup
    m.setup(feats(pair0=s.detach()), feats(pair0=t))
    assert not m.needs_setup and isinstance(m.adapters["0"], kind)
    m.double()
    loss = m.loss(feats(pair0=s), feats(pair0=t))
    expected = F.mse_loss(m.adapters["0"](s), t)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    if kind is nn.Sequential:  # 1x1 conv without bias + BatchNorm
        conv, bn = m.adapters["0"]
        assert conv.kernel_size == (1, 1) and conv.bias is None and isinstance(bn, nn.BatchNorm2d)


def test_sld_identity_when_widths_agree_and_pooling_of_maps():
    m = dx.method("sld", student="a", teacher="b")
    s, t = leaf(2, 3, 8, 8), const(2, 3, 4, 4)
    m.setup(feats(pair0=s.detach()), feats(pair0=t))
    assert isinstance(m.adapters["0"], nn.Identity) and list(m.parameters()) == []
    torch.testing.assert_close(m.loss(feats(pair0=s), feats(pair0=t)), F.mse_loss(F.adaptive_avg_pool2d(s, 4), t))


def test_sld_eager_adapters_and_several_pairs():
    m = dx.method("sld", student=["a", "b"], teacher=["c", "d"], adapter="linear", student_width=[3, 4],
                  teacher_width=5)
    assert not m.needs_setup
    assert [(a.in_features, a.out_features) for a in m.adapters.values()] == [(3, 5), (4, 5)]
    assert [(r.key, r.student, r.teacher) for r in m.features()] == [("pair0", "a", "c"), ("pair1", "b", "d")]
    s0, s1, t = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 5)
    expected = F.mse_loss(m.adapters["0"](s0), t) + F.mse_loss(m.adapters["1"](s1), t)
    torch.testing.assert_close(m.loss(feats(pair0=s0, pair1=s1), feats(pair0=t, pair1=t)), expected)
    with pytest.raises(FeatureShapeError, match=r"'sld'.*'pair0'.*student layer 'a'.*width 4 but the adapter expects 3"):
        m.loss(feats(pair0=s1, pair1=s1), feats(pair0=t, pair1=t))


def test_sld_errors():
    with pytest.raises(ValueError, match="adapter='linear'"):
        dx.method("sld", student_width=3, teacher_width=4)
    with pytest.raises(ValueError, match="both student_width and teacher_width"):
        dx.method("sld", student_width=3, adapter="linear")
    with pytest.raises(ValueError, match="same number of layers"):
        dx.method("sld", student=["a", "b"], teacher="c")
    m = dx.method("sld", student="fc1", teacher="blocks.2")
    with pytest.raises(RuntimeError, match="call method.setup"):
        m.loss(feats(pair0=torch.randn(2, 3)), feats(pair0=torch.randn(2, 4)))
    with pytest.raises(FeatureShapeError, match=r"method 'sld': feature 'pair0' \(student layer 'fc1', teacher layer "
                                                r"'blocks.2'\).*different ranks"):
        m.setup(feats(pair0=torch.randn(2, 3)), feats(pair0=torch.randn(2, 4, 4, 4)))
    with pytest.raises(FeatureShapeError, match="same length L"):
        m.setup(feats(pair0=torch.randn(2, 3, 5)), feats(pair0=torch.randn(2, 4, 5)))


# -- kfd / sp / nst -----------------------------------------------------------------------------
def rbf_gram(x):
    d2 = torch.cdist(x, x).pow(2)
    n = x.shape[0]
    sigma2 = d2.sum() / (n * (n - 1))  # the mean pairwise squared distance
    return torch.exp(-d2 / (2 * sigma2.detach()))


def test_kfd_rbf_matches_direct_gram_matching():
    m = dx.method("kfd", student="l3", teacher="l3")
    s, t = leaf(6, 2, 3), const(6, 5)  # any per-sample shape; widths differ
    loss = m.loss(feats(pair0=s), feats(pair0=t))
    expected = (rbf_gram(s.flatten(1)) - rbf_gram(t)).pow(2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert s.grad.abs().sum() > 0


@pytest.mark.parametrize("options, gram", [
    ({"kernel": "polynomial", "degree": 3, "coef0": 0.5}, lambda x: (x @ x.T / x.shape[1] + 0.5) ** 3),
    ({"kernel": "linear"}, lambda x: x @ x.T),
    ({"kernel": "cosine"}, lambda x: F.normalize(x, dim=1) @ F.normalize(x, dim=1).T),
    ({"kernel": "rbf", "sigma2": 2.0}, lambda x: torch.exp(-torch.cdist(x, x).pow(2) / 4.0)),
])
def test_kfd_kernels_and_params(options, gram):
    m = dx.method("kfd", **options)
    assert m.features() == [FeatureRequest("pair0", PENULTIMATE, PENULTIMATE)]
    s, t = leaf(5, 4), const(5, 7)
    torch.testing.assert_close(m.loss(feats(pair0=s), feats(pair0=t)), (gram(s) - gram(t)).pow(2).mean())


def test_kfd_option_validation():
    with pytest.raises(ValueError, match="option degree applies to the polynomial kernel"):
        dx.method("kfd", kernel="rbf", degree=3)
    with pytest.raises(ValueError, match=r"method 'kfd': option kernel: unknown kernel 'nope'; registered kernels: "
                                         r"'chebyshev', 'cosine', 'linear', 'polynomial', 'rbf'$"):
        dx.method("kfd", kernel="nope")
    with pytest.raises(ValueError, match="method 'kfd': option kernel must be one of linear, polynomial"):
        KFD(kernel="nope")  # built directly, a name is not looked up in the registry
    with pytest.raises(ValueError, match="sigma2 must be a finite number > 0"):
        dx.method("kfd", kernel="rbf", sigma2=0.0)
    m = dx.method("kfd", student="fc", teacher="head")
    with pytest.raises(FeatureShapeError, match=r"'kfd'.*student layer 'fc'.*shape \(4,\)"):
        m.loss(feats(pair0=torch.randn(4)), feats(pair0=torch.randn(4, 3)))


def test_sp_matches_tung_mori():
    m = dx.method("sp", student=["a", "b"], teacher=["c", "d"])
    s0, s1, t0, t1 = leaf(8, 3, 2, 2), leaf(8, 6, seed=2), const(8, 5, 3, 3), const(8, 4, seed=3)

    def sp(a, b):
        ga, gb = a.flatten(1) @ a.flatten(1).T, b.flatten(1) @ b.flatten(1).T
        return (F.normalize(ga, dim=1) - F.normalize(gb, dim=1)).pow(2).sum() / a.shape[0] ** 2

    loss = m.loss(feats(pair0=s0, pair1=s1), feats(pair0=t0, pair1=t1))
    torch.testing.assert_close(loss, sp(s0, t0) + sp(s1, t1))


def nst_direct(fs, ft, kernel):
    """Per image: channels as rows normalised over H·W, squared MMD; mean over images."""
    total = 0
    for b in range(fs.shape[0]):
        x, z = F.normalize(fs[b].flatten(1), dim=1), F.normalize(ft[b].flatten(1), dim=1)
        total = total + kernel(x, x).mean() + kernel(z, z).mean() - 2 * kernel(x, z).mean()
    return total / fs.shape[0]


def test_nst_matches_per_image_mmd_with_pooling():
    m = dx.method("nst", student="layer3", teacher="layer3")
    s, t = leaf(3, 4, 8, 8), const(3, 6, 4, 4)  # channels differ; the student map is pooled to 4x4
    poly = lambda x, z: (x @ z.T / x.shape[1]) ** 2  # noqa: E731  degree 2, coef0 0 (the paper's), /D
    loss = m.loss(feats(pair0=s), feats(pair0=t))
    torch.testing.assert_close(loss, nst_direct(F.adaptive_avg_pool2d(s, 4), t, poly))
    loss.backward()
    assert s.grad.abs().sum() > 0
    lin = dx.method("nst", student="a", teacher="b", kernel="linear")
    torch.testing.assert_close(lin.loss(feats(pair0=t), feats(pair0=s.detach())),
                               nst_direct(t, F.adaptive_avg_pool2d(s.detach(), 4), lambda x, z: x @ z.T))


@pytest.mark.parametrize("name", ["nst", "at"])
def test_map_methods_reject_vectors_naming_layer(name):
    m = dx.method(name, student="fc1", teacher="classifier.0")
    with pytest.raises(FeatureShapeError, match=rf"method '{name}': feature 'pair0' \(student layer 'fc1'\).*"
                                                r"shape \(4, 16\).*\(B, C, H, W\)"):
        m.loss(feats(pair0=torch.randn(4, 16)), feats(pair0=torch.randn(4, 8, 2, 2)))
    with pytest.raises(ValueError, match="option student is required"):
        dx.method(name)


# -- at ----------------------------------------------------------------------------------------------
def test_at_matches_zagoruyko_komodakis():
    m = dx.method("at", student=["l1", "l2"], teacher=["l1", "l2"], p=2)

    def a(f, size):
        amap = f.pow(2).mean(1, keepdim=True)
        amap = F.adaptive_avg_pool2d(amap, size) if amap.shape[-1] != size else amap
        return F.normalize(amap.flatten(1), dim=1)

    s1, s2, t1, t2 = leaf(2, 3, 4, 4), leaf(2, 5, 8, 8, seed=3), const(2, 6, 4, 4), const(2, 7, 4, 4, seed=4)
    loss = m.loss(feats(pair0=s1, pair1=s2), feats(pair0=t1, pair1=t2))
    expected = (a(s1, 4) - a(t1, 4)).pow(2).mean() + (a(s2, 4) - a(t2, 4)).pow(2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert s1.grad.abs().sum() > 0 and s2.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="option p must be a finite number > 0"):
        dx.method("at", student="a", teacher="b", p=0)


# -- transformers --------------------------------------------------------------------------------------
def heads(x, n):
    B, L, H = x.shape
    return x.view(B, L, n, H // n).transpose(1, 2)


def kl_relation(xs, ys, xt, yt):
    """mean over (B, heads, rows) of KL(softmax(xt ytᵀ/√dt) ‖ softmax(xs ysᵀ/√ds))."""
    ls = xs @ ys.transpose(-1, -2) / math.sqrt(xs.shape[-1])
    lt = xt @ yt.transpose(-1, -2) / math.sqrt(xt.shape[-1])
    pt = lt.softmax(-1)
    return (pt * (lt.log_softmax(-1) - ls.log_softmax(-1))).sum(-1).mean()


def qkv(B=2, L=5, Hs=8, Ht=12):
    s = {p: leaf(B, L, Hs, seed=i) for i, p in enumerate("qkv")}
    t = {p: const(B, L, Ht, seed=10 + i) for i, p in enumerate("qkv")}
    return s, t


def test_minilm_matches_attention_and_value_relation():
    m = dx.method("minilm", student="enc.layers.-1.attn", teacher="enc.layers.-1.attn", student_heads=2,
                  teacher_heads=2)
    assert [(r.key, r.student) for r in m.features()] == [
        ("q0", "enc.layers.-1.attn.q_proj"), ("k0", "enc.layers.-1.attn.k_proj"), ("v0", "enc.layers.-1.attn.v_proj")]
    s, t = qkv()
    loss = m.loss(feats(q0=s["q"], k0=s["k"], v0=s["v"]), feats(q0=t["q"], k0=t["k"], v0=t["v"]))
    h = {side: {p: heads(x, 2) for p, x in d.items()} for side, d in (("s", s), ("t", t))}
    expected = (kl_relation(h["s"]["q"], h["s"]["k"], h["t"]["q"], h["t"]["k"])
                + kl_relation(h["s"]["v"], h["s"]["v"], h["t"]["v"], h["t"]["v"]))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(x.grad.abs().sum() > 0 for x in s.values())


def test_minilm_key_padding_mask_and_explicit_paths():
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    m = dx.method("minilm", student_q="s.wq", student_k="s.wk", student_v="s.wv", teacher="t.attn",
                  projections=("query", "key", "value"), student_heads=2, teacher_heads=2,
                  key_padding_mask=lambda batch: batch[0])
    assert [(r.student, r.teacher) for r in m.features()] == [
        ("s.wq", "t.attn.query"), ("s.wk", "t.attn.key"), ("s.wv", "t.attn.value")]
    s, t = qkv()
    loss = m.loss(feats(q0=s["q"], k0=s["k"], v0=s["v"]), feats(q0=t["q"], k0=t["k"], v0=t["v"]), (mask, None))
    trimmed = m.loss(feats(q0=s["q"][:1, :3], k0=s["k"][:1, :3], v0=s["v"][:1, :3]),
                     feats(q0=t["q"][:1, :3], k0=t["k"][:1, :3], v0=t["v"][:1, :3]), (None, None))
    full = m.loss(feats(q0=s["q"][1:], k0=s["k"][1:], v0=s["v"][1:]), feats(q0=t["q"][1:], k0=t["k"][1:], v0=t["v"][1:]),
                  (None, None))
    torch.testing.assert_close(loss, (3 * trimmed + 5 * full) / 8)  # valid rows: 3 + 5


def test_minilm_needs_equal_heads_naming_both():
    with pytest.raises(ValueError, match=r"student_heads=2 \(student 'a.q_proj'\) and teacher_heads=4 \(teacher "
                                         r"'b.q_proj'\).*minilmv2"):
        dx.method("minilm", student="a", teacher="b", student_heads=2, teacher_heads=4)
    # the student layer defaults to "last", which only the model can resolve (Distiller: bind)
    with pytest.raises(ValueError, match=r"the student layer \('last'\) is found in the model.*method.bind"):
        dx.method("minilm", teacher="b", student_heads=2, teacher_heads=2).features()
    with pytest.raises(ValueError, match="student_heads must be a positive int"):
        dx.method("minilm", student="a", teacher="b", student_heads=0)
    headless = dx.method("minilm", student="a", teacher="b")  # heads come from model.config when bound
    s, t = qkv()
    with pytest.raises(ValueError, match="student's attention head count is unknown: give student_heads"):
        headless.loss(feats(q0=s["q"], k0=s["k"], v0=s["v"]), feats(q0=t["q"], k0=t["k"], v0=t["v"]))


def test_minilmv2_matches_relations_across_widths():
    m = dx.method("minilmv2", student="s", teacher="t", num_relation_heads=4)
    s, t = qkv(Hs=8, Ht=12)  # student 8 wide, teacher 12: relation heads of width 2 and 3
    loss = m.loss(feats(q0=s["q"], k0=s["k"], v0=s["v"]), feats(q0=t["q"], k0=t["k"], v0=t["v"]))
    expected = sum(kl_relation(heads(s[p], 4), heads(s[p], 4), heads(t[p], 4), heads(t[p], 4)) for p in "qkv")
    torch.testing.assert_close(loss, expected)
    only_v = dx.method("minilmv2", student="s", teacher="t", num_relation_heads=4, relations=["vv"])
    assert [r.key for r in only_v.features()] == ["v0"]
    torch.testing.assert_close(only_v.loss(feats(v0=s["v"]), feats(v0=t["v"])),
                               kl_relation(heads(s["v"], 4), heads(s["v"], 4), heads(t["v"], 4), heads(t["v"], 4)))
    bad = dx.method("minilmv2", student="s.attn", teacher="t.attn", num_relation_heads=3)
    with pytest.raises(FeatureShapeError, match=r"'minilmv2'.*student layer 's.attn.q_proj'.*width 8 is not divisible "
                                                r"by num_relation_heads=3"):
        bad.loss(feats(q0=s["q"], k0=s["k"], v0=s["v"]), feats(q0=t["q"], k0=t["k"], v0=t["v"]))
    with pytest.raises(ValueError, match="relations"):
        dx.method("minilmv2", student="s", teacher="t", num_relation_heads=4, relations=["qk"])


def test_tinybert_attn_matches_score_mse():
    m = dx.method("tinybert_attn", student=["s0", "s1"], teacher=["t1", "t3"], student_heads=2, teacher_heads=2)
    assert [r.key for r in m.features()] == ["q0", "k0", "q1", "k1"]
    s, t = qkv()
    s2, t2 = qkv()
    loss = m.loss(feats(q0=s["q"], k0=s["k"], q1=s2["k"], k1=s2["q"]),
                  feats(q0=t["q"], k0=t["k"], q1=t2["k"], k1=t2["q"]))

    def scores(q, k):
        q, k = heads(q, 2), heads(k, 2)
        return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])

    expected = (F.mse_loss(scores(s["q"], s["k"]), scores(t["q"], t["k"]))
                + F.mse_loss(scores(s2["k"], s2["q"]), scores(t2["k"], t2["q"])))
    torch.testing.assert_close(loss, expected)


def test_tinybert_attn_scores_capture_and_head_mismatch():
    m = dx.method("tinybert_attn", student_scores="s.attn:1", teacher_scores="t.attn:1")
    assert [(r.key, r.student, r.teacher) for r in m.features()] == [("scores0", "s.attn:1", "t.attn:1")]
    a, b = leaf(2, 3, 4, 4), const(2, 3, 4, 4)
    torch.testing.assert_close(m.loss(feats(scores0=a), feats(scores0=b)), F.mse_loss(a, b))
    with pytest.raises(FeatureShapeError, match=r"'tinybert_attn': feature 'scores0' \(student layer 's.attn:1', "
                                                r"teacher layer 't.attn:1'\).*student has 3 heads and the teacher 4"):
        m.loss(feats(scores0=a), feats(scores0=const(2, 4, 4, 4)))
    with pytest.raises(ValueError, match="student_heads=2, teacher_heads=4"):
        dx.method("tinybert_attn", student="a", teacher="b", student_heads=2, teacher_heads=4)
    with pytest.raises(ValueError, match="both student_scores and teacher_scores"):
        dx.method("tinybert_attn", student_scores="a:1")
    mask = torch.tensor([[True, True, False, False], [True] * 4])
    masked = dx.method("tinybert_attn", student_scores="s", teacher_scores="t", key_padding_mask=lambda b: b[0])
    keep = (mask[:, :, None] & mask[:, None, :])[:, None].expand(2, 3, 4, 4)
    torch.testing.assert_close(masked.loss(feats(scores0=a), feats(scores0=b), (mask, None)),
                               (a - b)[keep].pow(2).mean())


def test_attention_methods_need_tokens():
    m = dx.method("minilmv2", student="s", teacher="t", num_relation_heads=2)
    with pytest.raises(FeatureShapeError, match=r"student layer 's.q_proj'.*tokens \(B, L, H\)"):
        m.loss(feats(q0=torch.randn(2, 8), k0=torch.randn(2, 5, 8), v0=torch.randn(2, 5, 8)),
               feats(q0=torch.randn(2, 5, 8), k0=torch.randn(2, 5, 8), v0=torch.randn(2, 5, 8)))


@pytest.mark.parametrize("name, options", [
    ("sld", {}), ("kfd", {}), ("sp", {}), ("nst", {"student": "a", "teacher": "b"}),
    ("at", {"student": "a", "teacher": "b"}),
    ("minilm", {"student": "a", "teacher": "b", "student_heads": 2, "teacher_heads": 2}),
    ("minilmv2", {"student": "a", "teacher": "b", "num_relation_heads": 2}),
    ("tinybert_attn", {"student": "a", "teacher": "b", "student_heads": 2, "teacher_heads": 2}),
    ("lm_kd", {"divergence": "jsd", "beta": 0.2}),
])
def test_registered_with_docs_and_config_round_trip(name, options):
    m = dx.method(name, **options)
    doc = type(m).__doc__
    assert "Paper" in doc and "Example::" in doc and "Options:" in doc
    assert type(m)(**m.config()).config() == m.config()
    assert dx.plugin.get_registries().methods.provider(name) == "distillx.methods"
