"""Transformer families found, not spelled out: q/k/v projections, fused c_attn, grouped-query heads,
layers by "last"/index/path; the attention methods on each family, with masks from the batch."""
from __future__ import annotations

import math

import pytest
import torch

import distillx as dx
from distillx.hf import AttentionNotFoundError, find_attention
from distillx.hf.attention import relation_heads

from .models import bert, distilbert, gpt2, llama, token_batch


def test_families_are_found_with_their_heads():
    b = find_attention(bert(3, 32, 4), "last")
    assert (b.path, b.q, b.k, b.v, b.heads, b.kv_heads, b.chunks) == (
        "encoder.layer.2.attention.self", "encoder.layer.2.attention.self.query", "encoder.layer.2.attention.self.key",
        "encoder.layer.2.attention.self.value", 4, 4, 1)
    d = find_attention(distilbert(2, 32, 4), 0)
    assert (d.q, d.v, d.heads) == ("transformer.layer.0.attention.q_lin", "transformer.layer.0.attention.v_lin", 4)
    g = find_attention(gpt2(2, 32, 4), -1)
    assert (g.q, g.k, g.v, g.chunks, g.widths, g.heads) == ("transformer.h.1.attn.c_attn",) * 3 + (3, (32, 32, 32), 4)
    assert g.capture("k") == ("transformer.h.1.attn.c_attn", {"chunks": 3, "index": 1})
    m = find_attention(llama(3, 32, 4, 2), "model.layers.1")  # a whole layer: the attention inside it
    assert (m.path, m.widths, m.heads, m.kv_heads) == ("model.layers.1.self_attn", (32, 16, 16), 4, 2)
    assert find_attention(llama(3, 32, 4, 2), "model.layers.-1.self_attn").path == "model.layers.2.self_attn"
    assert relation_heads([b], [m], ("q", "k", "v")) == 4  # divides 32 and 16


def test_detection_errors_say_what_was_looked_for_and_found():
    with pytest.raises(IndexError, match=r"student: layer index 5 is out of range: the layer stack 'encoder.layer' "
                                         r"has 2 layers \(indices 0..1, or -2..-1\)"):
        find_attention(bert(2), 5, name="student")
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(AttentionNotFoundError, match=r"teacher \(Sequential\): found no self-attention layer: looked "
                                                     r"for modules with submodules named query/key/value \(BERT/RoBERTa\).*"
                                                     r"q_proj/k_proj/v_proj.*c_attn \(GPT-2\); its modules: 0, 1"):
        find_attention(mlp, "last", name="teacher")
    with pytest.raises(AttentionNotFoundError, match=r"'encoder.layer.0.output' is no attention module and holds none"):
        find_attention(bert(2), "encoder.layer.0.output")
    with pytest.raises(AttentionNotFoundError, match=r"projections=\('wq', 'wk', 'wv'\)"):
        find_attention(bert(2), "last", projections=("wq", "wk", "wv"))
    # through the Distiller, the method and side are named
    with pytest.raises(IndexError, match=r"method 'minilmv2': teacher: layer index 9 is out of range"):
        dx.Distiller(bert(2), bert(2, 16, 2), [dx.method("minilmv2", teacher=9)])


def test_explicit_options_win():
    teacher, student = bert(2, 32, 4), bert(2, 16, 2)
    m = dx.method("minilm", student="encoder.layer.0.attention.self", teacher=-1, student_heads=4,
                  teacher_heads=4, projections=("query", "key", "value"))
    m.bind(student, teacher)
    assert m._heads == {"student": 4, "teacher": 4}  # the given counts, not the config's 2
    assert [r.student for r in m.features()][:1] == ["encoder.layer.0.attention.self.query"]
    v2 = dx.method("minilmv2", student_q="encoder.layer.1.attention.self.key", num_relation_heads=2)
    v2.bind(student, teacher)
    assert v2.features()[0].student == "encoder.layer.1.attention.self.key" and v2.relation_head_count() == 2
    with pytest.raises(ValueError, match=r"MiniLM compares attention distributions head by head.*student_heads=2 "
                                         r"\(student 'encoder.layer.1.attention.self.query'\) and teacher_heads=4"):
        dx.method("minilm").bind(student, teacher)


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama"])
@pytest.mark.parametrize("name", ["minilm", "minilmv2", "tinybert_attn"])
def test_attention_methods_train_on_each_family(family, name):
    torch.manual_seed(0)
    build = {"bert": lambda: (bert(3, 32, 4), bert(2, 16, 4)), "distilbert": lambda: (distilbert(3, 32, 4),
                                                                                       distilbert(2, 16, 4)),
             "gpt2": lambda: (gpt2(2, 32, 4), gpt2(1, 16, 4)), "llama": lambda: (llama(2, 32, 4, 2), llama(1, 16, 4, 1))}
    teacher, student = build[family]()
    teacher.eval()
    before = [p.detach().clone() for p in teacher.parameters()]
    batches = [token_batch(4, 8, seed=i) for i in range(2)]
    d = dx.Distiller(teacher, student, [dx.method(name)], task_weight=0.0, progress=False,
                     optimizer=lambda p: torch.optim.Adam(p, lr=3e-3), scheduler=None)
    history = d.fit(batches, 6)
    assert history[-1][name] < history[0][name], history
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_captured_projections_are_the_models_q_k_v():
    torch.manual_seed(0)
    teacher, student = gpt2(2, 32, 4).eval(), llama(1, 16, 4, 2).eval()
    batch = token_batch(2, 6)
    m = dx.method("minilmv2", relations=["qq", "kk", "vv"])
    d = dx.Distiller(teacher, student, [m], task_weight=0.0)
    s_logits, s_feats, t_logits, t_feats = d._step.forward(batch)
    s, t = d._plan.views(0, s_logits, s_feats, t_logits, t_feats)
    with torch.no_grad():
        h = teacher.transformer.h[1].ln_1(teacher(**batch, output_hidden_states=True).hidden_states[1])
        qkv = teacher.transformer.h[1].attn.c_attn(h)
    torch.testing.assert_close(t["k0"], qkv[..., 32:64])  # GPT-2's fused [q | k | v], k is the middle third
    assert s["k0"].shape == (2, 6, 8) and s["q0"].shape == (2, 6, 16)  # grouped-query k: 2 heads of 4
    assert m.relation_head_count() == 4
    d.close()


@pytest.mark.parametrize("name, options", [("minilmv2", {}), ("minilm", {}), ("tinybert_attn", {}),
                                           ("sld", {"student": "encoder.layer.-1", "teacher": "encoder.layer.-1"}),
                                           ("kfd", {"student": "encoder.layer.-1", "teacher": "encoder.layer.-1"}),
                                           ("sp", {"student": "encoder.layer.-1", "teacher": "encoder.layer.-1"}),
                                           ("nst", {"student": "encoder.layer.-1", "teacher": "encoder.layer.-1"})])
def test_padding_is_left_out_of_token_losses(name, options):
    """Changing the padding tokens changes the models' hidden states there, never the loss."""
    torch.manual_seed(0)
    teacher, student = bert(2, 32, 4).eval(), bert(2, 32, 4).eval()
    batch = token_batch(4, 8, seed=3)
    assert (batch["attention_mask"] == 0).any()
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
    d = dx.Distiller(teacher, student, [dx.method(name, **options)], task_weight=0.0, example_inputs=batch)
    with torch.no_grad():
        a, b = d.losses(batch)[name], d.losses(other)[name]
        states = [student(**x).last_hidden_state for x in (batch, other)]
    assert not torch.allclose(states[0], states[1])  # the padded positions did change
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    off = dx.method(name, **options, **({"key_padding_mask": False} if name in ("minilm", "minilmv2",
                                                                              "tinybert_attn") else {}))
    if name in ("minilm", "minilmv2", "tinybert_attn"):  # key_padding_mask=False: the padding counts again
        d2 = dx.Distiller(teacher, student, [off], task_weight=0.0)
        with torch.no_grad():
            assert not math.isclose(d2.losses(batch)[name].item(), d2.losses(other)[name].item(), rel_tol=1e-6)
    d.close()


def test_a_mask_of_the_wrong_shape_is_named():
    torch.manual_seed(0)
    m = dx.method("minilmv2", student="s", teacher="t", num_relation_heads=2)
    x = torch.randn(2, 5, 8)
    feats = {"q0": x, "k0": x, "v0": x}
    with pytest.raises(ValueError, match=r"method 'minilmv2', feature 'q0': the attention mask has shape \(2, 4\) but "
                                         r"the tokens are \(2, 5\) \(batch, tokens\)"):
        m.loss(feats, feats, ({"attention_mask": torch.ones(2, 4)}, None))


def test_the_issue_example_runs_as_a_new_user_writes_it():
    """A BERT-style encoder teacher, a 2-layer BertModel student, batches straight from the tokenizer."""
    from .models import sentences, tokenizer

    torch.manual_seed(0)
    tok = tokenizer()
    teacher, student = bert(4, 32, 4).eval(), bert(2, 16, 2)
    text = sentences(12)
    batches = [tok(text[i:i + 4], padding=True, return_tensors="pt") for i in range(0, 12, 4)]
    history = dx.Distiller(teacher, student, [dx.method(
        "minilmv2", student="encoder.layer.-1.attention.self", teacher="encoder.layer.-1.attention.self",
        projections=("query", "key", "value"))], progress=False).fit(batches)
    assert len(history) == 1 and history[0]["minilmv2"] > 0 and history[0]["task"] == 0.0


def test_models_without_head_counts_need_the_option():
    class Attn(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(width, width) for _ in range(3))

        def forward(self, x):
            return self.q_proj(x) + self.k_proj(x) + self.v_proj(x)

    def net(width):  # the model itself is the layer stack
        return torch.nn.Sequential(Attn(width), Attn(width))

    with pytest.raises(ValueError, match=r"method 'minilm': the student's attention head count is unknown: give "
                                         r"student_heads"):
        dx.Distiller(net(8), net(8), [dx.method("minilm")])
    d = dx.Distiller(net(8), net(8), [dx.method("minilm", student_heads=2, teacher_heads=2)], task_weight=0.0,
                     progress=False)
    assert [r.student for r in d.methods[0].features()] == ["1.q_proj", "1.k_proj", "1.v_proj"]
    assert d.fit([(torch.randn(4, 5, 8), None)], 1)[0]["minilm"] > 0
