"""layer_map's data-free rules and map="auto": the map whose pruned teacher stays closest to the
teacher on calibration data, with each layer's block influence, against hand computations."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import distillx as dx
from distillx.transfer import TransferError
from distillx.transfer.layer_map import every_map, uniform_map


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Residual(nn.Module):
    def __init__(self, layers=6, width=8, classes=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(layers))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def calibration(n=4, width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, width, generator=g), torch.zeros(16, dtype=torch.long)) for _ in range(n)]


def _penultimate(model, x):
    feats = []
    h = model.head.register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    return feats[0]


def _distance(a, b):
    return float((1 - nn.functional.cosine_similarity(a, b, dim=-1)).mean())


def test_the_data_free_rules():
    assert every_map(2, 6) == [0, 3] and uniform_map(2, 6) == [0, 5]
    assert every_map(3, 6) == [0, 2, 4] and uniform_map(3, 6) == [0, 2, 5]
    assert uniform_map(6, 12) == [0, 2, 4, 7, 9, 11] and uniform_map(1, 4) == [0]
    torch.manual_seed(0)
    t, s = Residual(), Residual(layers=2)
    report = dx.transfer("layer_map", t, s)  # the default: first and last layer
    assert torch.equal(s.blocks[1].fc.weight, t.blocks[5].fc.weight)
    dx.transfer("layer_map", t, s, map="every")
    assert torch.equal(s.blocks[1].fc.weight, t.blocks[3].fc.weight)
    assert "student layer i <- teacher layer [0, 5]" in "\n".join(report.notes)


def test_auto_keeps_the_layers_that_do_something():
    torch.manual_seed(0)
    t = Residual()
    with torch.no_grad():
        for i in (1, 2, 4):  # these blocks are the identity: x + tanh(0)
            t.blocks[i].fc.weight.zero_()
            t.blocks[i].fc.bias.zero_()
    s = Residual(layers=3)
    report = dx.transfer("layer_map", t, s, map="auto", calibration=calibration())
    layers = report.importance["layers"]["blocks"]
    assert layers["map"] == [0, 3, 5] and layers["distance"] == pytest.approx(0, abs=1e-6)
    assert [b == 0 for b in layers["block_influence"]] == [False, True, True, False, True, False]
    assert layers["search"] == "exhaustive over 20 maps"
    x = calibration()[0][0]
    with torch.no_grad():
        assert torch.allclose(s(x), t(x), atol=1e-6)  # the student computes the teacher at init


def test_auto_distance_and_influence_equal_hand_computations():
    torch.manual_seed(1)
    t, data = Residual(layers=5), calibration(3)
    s = Residual(layers=2)
    report = dx.transfer("layer_map", t, s, map="auto", calibration=data)
    found = report.importance["layers"]["blocks"]
    x = torch.cat([b[0] for b in data])
    # influence: 1 - cos(input, output) of each block on the full teacher, over every row
    h, influence = x, []
    with torch.no_grad():
        for block in t.blocks:
            out = block(h)
            influence.append(_distance(h, out))
            h = out
    assert found["block_influence"] == pytest.approx(influence, abs=1e-5)
    # the distance of every map is the gap between the student it initialises and the teacher
    reference = _penultimate(t, x)
    distances = {}
    for a in range(5):
        for b in range(a + 1, 5):
            candidate = Residual(layers=2)
            dx.transfer("layer_map", t, candidate, map=[a, b])
            distances[(a, b)] = _distance(_penultimate(candidate, x), reference)
    best = min(distances, key=distances.get)
    assert found["map"] == list(best)
    assert found["distance"] == pytest.approx(distances[best], abs=1e-5)
    assert torch.equal(s.blocks[0].fc.weight, t.blocks[best[0]].fc.weight)


def test_greedy_search_beyond_the_candidate_limit(monkeypatch):
    from distillx.transfer import depth

    monkeypatch.setattr(depth, "MAX_CANDIDATES", 5)
    torch.manual_seed(0)
    t = Residual()
    with torch.no_grad():
        for i in (0, 3):
            t.blocks[i].fc.weight.zero_()
            t.blocks[i].fc.bias.zero_()
    report = dx.transfer("layer_map", t, Residual(layers=4), map="auto", calibration=calibration())
    found = report.importance["layers"]["blocks"]
    assert found["map"] == [1, 2, 4, 5] and found["search"].startswith("greedy removal")


def test_hugging_face_encoder_with_padding():
    models = pytest.importorskip("tests.hf.models")
    torch.manual_seed(0)
    t, s = models.bert(4, 32, 4).eval(), models.bert(2, 32, 4)
    batch = models.token_batch(4, 10)
    batch["attention_mask"][0, 6:] = 0
    report = dx.transfer("layer_map", t, s, map="auto", calibration=[batch])
    found = report.importance["layers"]["encoder.layer"]
    assert len(found["map"]) == 2 and len(found["block_influence"]) == 4
    # the reported distance is the student's own gap to the teacher at init (padding left out)
    with torch.no_grad():
        a, b = s(**batch).last_hidden_state, t(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    gap = (1 - nn.functional.cosine_similarity(a, b, dim=-1))[mask].mean()
    assert found["distance"] == pytest.approx(float(gap), abs=1e-5)


def test_bad_calibration_and_options_are_named():
    t, s = Residual(), Residual(layers=2)
    with pytest.raises(TransferError, match="layer_map needs calibration="):
        dx.transfer("layer_map", t, s, map="auto")
    with pytest.raises(TransferError, match="yielded no batches"):
        dx.transfer("layer_map", t, s, map="auto", calibration=[])
    with pytest.raises(TransferError, match="calibration= is used only with map=\"auto\""):
        dx.transfer("layer_map", t, s, calibration=calibration())
    with pytest.raises((TransferError, ValueError), match="map"):
        dx.transfer("layer_map", t, s, map="best")
