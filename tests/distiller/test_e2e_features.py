"""End to end: feature distillation through the Distiller on small conv nets (digits as 1×8×8 images)
and small transformers. Each method trains the student for a few steps with its own loss going down,
and the teacher's parameters and buffers stay bitwise untouched."""
from __future__ import annotations

import pytest
import torch

import distillx as dx
from distillx.data import digits_split
from distillx.distiller import Distiller
from distillx.engine.training import train

from distillx.testing import CNN, TinyTransformer, snapshot, unchanged

pytestmark = pytest.mark.filterwarnings("ignore:distillx::")


@pytest.fixture(scope="module")
def digits():
    split = digits_split(test_fraction=0.25, seed=0)
    return split.x_train[:256].reshape(-1, 1, 8, 8), split.y_train[:256]


@pytest.fixture(scope="module")
def cnn_teacher(digits):
    torch.manual_seed(0)
    x, y = digits
    teacher = CNN((16, 32, 64))
    train(teacher, [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)], epochs=2,
          optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    teacher.zero_grad(set_to_none=True)
    return teacher.eval()


CNN_METHODS = [
    ("sld", {"student": "layer2", "teacher": "layer3"}),                   # conv adapter, 8x8 pooled to 4x4
    ("sld", {}),                                                            # linear adapter, penultimate
    ("kfd", {"student": "layer3", "teacher": "layer3", "kernel": "rbf"}),
    ("kfd", {"kernel": "chebyshev"}),
    ("sp", {"student": ["layer2", "layer3"], "teacher": ["layer2", "layer3"]}),
    ("nst", {"student": "layer3", "teacher": "layer3", "weight": 100.0}),
    ("at", {"student": ["layer1", "layer2", "layer3"], "teacher": ["layer1", "layer2", "layer3"], "weight": 100.0}),
]


@pytest.mark.parametrize("name, options", CNN_METHODS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CNN_METHODS)])
def test_conv_feature_distillation(digits, cnn_teacher, name, options):
    x, y = digits
    batch = [(x[:64], y[:64])]  # one fixed batch: each step sees the same data, so the loss must fall
    torch.manual_seed(1)
    student = CNN((4, 8, 16), downsample=False)  # narrower, and layer2/layer3 maps are 8x8 vs the teacher's 4x4
    before = snapshot(cnn_teacher)
    method = dx.method(name, **options)
    d = Distiller(cnn_teacher, student, [method], task_weight=0.0, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    history = d.fit(batch, epochs=6)
    assert history[-1][name] < 0.8 * history[0][name], [h[name] for h in history]
    assert unchanged(cnn_teacher, before)
    assert all(p.grad is None for p in cnn_teacher.parameters())
    assert not cnn_teacher.training


def test_conv_methods_together_with_kd_and_task(digits, cnn_teacher):
    x, y = digits
    torch.manual_seed(2)
    student = CNN((4, 8, 16))
    before = snapshot(cnn_teacher)
    methods = [dx.method("kd", T=4.0, weight=0.5), dx.method("at", student="layer3", teacher="layer3", weight=100.0),
               dx.method("sld", student="layer3", teacher="layer3"), dx.method("sp", weight=10.0)]
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    history = Distiller(cnn_teacher, student, methods, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2)).fit(
        loader, epochs=3)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["loss"] == pytest.approx(sum(history[-1][k] for k in ("task", "kd", "at", "sld", "sp")))
    assert unchanged(cnn_teacher, before)


TEACHER_ATTN = "encoder.layers.-1.self_attn"
TRANSFORMER_METHODS = [
    # MiniLM: last layers, equal head counts (student 4 heads of width 4, teacher 4 heads of width 8)
    ("minilm", 4, {"student": TEACHER_ATTN, "teacher": TEACHER_ATTN, "student_heads": 4, "teacher_heads": 4}),
    # MiniLMv2: student 2 heads width 16, teacher 4 heads width 32, relation heads pair them up
    ("minilmv2", 2, {"student": "encoder.layers.-1.self_attn", "teacher": "encoder.layers.1.self_attn",
                     "num_relation_heads": 4}),
    # explicit q/k/v paths per side
    ("minilmv2", 2, {"student_q": "encoder.layers.1.self_attn.q_proj", "student_k": "encoder.layers.1.self_attn.k_proj",
                     "student_v": "encoder.layers.1.self_attn.v_proj", "teacher": "encoder.layers.2.self_attn",
                     "num_relation_heads": 8, "relations": ["qq", "vv"]}),
    # TinyBERT: uniform layer mapping 0->1, 1->2, equal heads
    ("tinybert_attn", 4, {"student": ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"],
                          "teacher": ["encoder.layers.1.self_attn", "encoder.layers.2.self_attn"],
                          "student_heads": 4, "teacher_heads": 4}),
    # TinyBERT reading the score matrices the attention modules return (element 1 of their output)
    ("tinybert_attn", 4, {"student_scores": "encoder.layers.1.self_attn:1",
                          "teacher_scores": "encoder.layers.2.self_attn:1"}),
]


@pytest.mark.parametrize("name, student_heads, options", TRANSFORMER_METHODS,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(TRANSFORMER_METHODS)])
def test_transformer_attention_distillation(name, student_heads, options):
    torch.manual_seed(0)
    teacher = TinyTransformer(dim=32, heads=4, depth=3).eval()
    student = TinyTransformer(dim=16, heads=student_heads, depth=2)
    x = torch.randn(16, 6, 8)
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    before = snapshot(teacher)
    method = dx.method(name, **options)
    d = Distiller(teacher, student, [method], task_weight=0.0, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    history = d.fit([(x, y)], epochs=8)
    assert history[-1][name] < 0.8 * history[0][name], [h[name] for h in history]
    assert unchanged(teacher, before)
    assert all(p.grad is None for p in teacher.parameters())


def test_minilm_refuses_different_head_counts():
    with pytest.raises(ValueError, match="student_heads=2 .* teacher_heads=4"):
        dx.method("minilm", student=TEACHER_ATTN, teacher=TEACHER_ATTN, student_heads=2, teacher_heads=4)
