"""The ``prune`` transfer on transformers: Minitron activation importance against hand-written
hooks, heads (GQA groups whole) / neurons / residual channels kept consistently, and a teacher whose
unimportant parts are exactly zero reproduced exactly by its pruned student."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import distillx as dx
from distillx.transfer import TransferError
from distillx.transfer.importance import measure
from distillx.transfer.channels import top_channels as top
from distillx.transfer.prune import kept_heads

models = pytest.importorskip("tests.hf.models")


def batches(n=2, seed=0):
    out = []
    for i in range(n):
        b = models.token_batch(4, 10, seed=seed + i)
        b["attention_mask"][1, 7:] = 0  # padding that must not count
        out.append(b)
    return out


def test_top_and_kept_heads():
    assert top(torch.tensor([0.1, 0.5, 0.5, 0.2]), 2) == [1, 2]
    assert top(torch.tensor([3.0, 1.0, 3.0]), 1) == [0]  # ties: the lower index
    scores = torch.tensor([1.0, 0.0, 5.0, 4.0, 0.5, 0.5])  # 6 query heads in 3 groups of 2
    assert kept_heads(scores, 6, 3, 4, 2) == ([0, 1, 2, 3], [0, 1])  # groups whole: sums 1, 9, 1 (ties: lower)
    assert kept_heads(scores * torch.tensor([1, 1, 1, 1, 4, 4.0]), 6, 3, 4, 2) == ([2, 3, 4, 5], [1, 2])
    assert kept_heads(scores, 6, 3, 3, 3) == ([0, 2, 4], [0, 1, 2])  # every group, its best query head
    assert kept_heads(scores, 6, 6, 2, 2) == ([2, 3], [2, 3])  # multi-head: the best heads
    with pytest.raises(TransferError, match="cannot map 6 query / 3 key-value heads onto 4 / 1"):
        kept_heads(scores, 6, 3, 4, 1)


def _reference_importance(model, data):
    """Minitron's scores by hand: head norms at the output projection's input, |activation| at the
    down projection's input, |LayerNorm output| per channel (each norm scaled to mean 1), real tokens."""
    heads_in, neurons_in, norm_out = {}, {}, {}
    hooks = []
    for i, layer in enumerate(model.encoder.layer):
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(
            lambda m, a, i=i: heads_in.setdefault(i, []).append(a[0])))
        hooks.append(layer.output.dense.register_forward_pre_hook(
            lambda m, a, i=i: neurons_in.setdefault(i, []).append(a[0])))
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    for k, m in enumerate(norms):
        hooks.append(m.register_forward_hook(lambda m, a, o, k=k: norm_out.setdefault(k, []).append(o)))
    masks = []
    with torch.no_grad():
        for b in data:
            model(**b)
            masks.append(b["attention_mask"].bool())
    for h in hooks:
        h.remove()
    heads = model.config.num_attention_heads

    def tokens(xs):
        return torch.cat([x[m] for x, m in zip(xs, masks)])

    head = {i: tokens(v).reshape(-1, heads, v[0].shape[-1] // heads).norm(dim=-1).mean(0) for i, v in heads_in.items()}
    neuron = {i: tokens(v).abs().mean(0) for i, v in neurons_in.items()}
    per_norm = [tokens(v).abs().mean(0) for v in norm_out.values()]
    channel = sum(s / s.mean() for s in per_norm)
    return head, neuron, channel


def test_importance_equals_hand_written_hooks():
    torch.manual_seed(0)
    model = models.bert(2, 32, 4).eval()
    data = batches()
    imp = measure(model, data, "prune")
    head, neuron, channel = _reference_importance(model, data)
    for i in range(2):
        assert torch.allclose(imp.heads[f"encoder.layer.{i}"], head[i], rtol=1e-5)
        assert torch.allclose(imp.neurons[f"encoder.layer.{i}"], neuron[i], rtol=1e-5)
    assert torch.allclose(imp.channels, channel, rtol=1e-5)


def _zero_heads(attn, heads, head_dim, qkv=("query", "key", "value")):
    with torch.no_grad():
        v = getattr(attn, qkv[2])
        for h in heads:
            v.weight[h * head_dim:(h + 1) * head_dim] = 0
            if v.bias is not None:
                v.bias[h * head_dim:(h + 1) * head_dim] = 0


@pytest.mark.parametrize("family", ["bert-neurons", "llama-gqa"])
def test_a_teacher_whose_dropped_parts_are_zero_is_reproduced_exactly(family):
    """MLP neurons whose output weights are zero, and (LLaMA, where the head size is its own) a
    key/value group whose values are zero, contribute nothing: a student of the same width and depth
    with fewer neurons (and heads) that keeps the others computes exactly the teacher; any other
    choice would not."""
    torch.manual_seed(0)
    if family == "bert-neurons":  # BERT's head size is width / heads: fewer heads means another width
        t = models.bert(2, 32, 4, intermediate_size=64).eval()
        s = models.bert(2, 32, 4, intermediate_size=40)
        layers, up, key = t.encoder.layer, ["intermediate.dense"], "last_hidden_state"
    else:
        t = models.llama(2, 32, 4, 2, head_dim=8, intermediate_size=64).eval()
        s = models.llama(2, 32, 2, 1, head_dim=8, intermediate_size=40)
        layers, up, key = t.model.layers, ["mlp.gate_proj"], "logits"
        with torch.no_grad():
            for layer in layers:  # key/value group 0 (query heads 0 and 1) attends to zero values
                layer.self_attn.v_proj.weight[:8] = 0

    def gone(j):  # 24 of the 64 neurons, others in each layer; their activation is exactly 0
        return [k for k in range(64) if (k + j) % 8 < 3]

    for j, layer in enumerate(layers):
        with torch.no_grad():
            for name in up:
                layer.get_submodule(name).weight[gone(j)] = 0
                if layer.get_submodule(name).bias is not None:
                    layer.get_submodule(name).bias[gone(j)] = 0
    report = dx.transfer("prune", t, s, calibration=batches())
    for j in range(2):
        kept = report.importance["neurons"][f"{'encoder.layer' if family == 'bert-neurons' else 'model.layers'}.{j}"]
        assert kept["kept neurons"] == [k for k in range(64) if k not in gone(j)]
    if family == "llama-gqa":
        heads = report.importance["heads"]["model.layers.0"]
        assert heads["kept key/value heads"] == [1] and heads["kept query heads"] == [2, 3]
    b = batches()[0]
    with torch.no_grad():
        assert torch.allclose(s(**b)[key], t(**b)[key], atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_a_narrower_shallower_student_is_finite_and_reported(family):
    torch.manual_seed(1)
    t, s = {"bert": (models.bert(4, 32, 4), models.bert(2, 16, 2)),
            "gpt2": (models.gpt2(3, 32, 4), models.gpt2(2, 16, 2)),
            "llama": (models.llama(3, 32, 4, 2), models.llama(2, 16, 2, 1))}[family]
    report = dx.transfer("prune", t.eval(), s, calibration=batches(), layers="auto")
    assert report.complete and report.counts()["skipped"] == 0
    assert set(report.importance) == {"layers", "heads", "neurons", "channels"}
    channels = report.importance["channels"]
    assert channels["kept"] == 16 and channels["kept channels"] == top(torch.tensor(channels["scores"]), 16)
    with torch.no_grad():
        out = s(**batches()[0])
    assert torch.isfinite(out[0]).all()
    # every residual tensor kept the same channels: the embedding's columns are the final norm's entries
    emb = s.get_input_embeddings().weight
    t_emb = t.get_input_embeddings().weight
    assert torch.equal(emb, t_emb[:, channels["kept channels"]])


def test_calibration_is_required_and_must_yield_batches():
    t, s = models.bert(2, 32, 4), models.bert(2, 16, 2)
    with pytest.raises(TransferError, match="prune needs calibration="):
        dx.transfer("prune", t, s)
    with pytest.raises(TransferError, match="yielded no batches"):
        dx.transfer("prune", t, s, calibration=[])


def test_cnn_and_mlp_through_the_strategy():
    """dx.transfer("prune") on models without attention: the channel spaces (a ResNet stage shares
    its stream channels, BatchNorm statistics follow their conv), a dead-unit MLP reproduced."""
    from .test_channels import TinyResNet, dead_mlp, mlp

    torch.manual_seed(0)
    teacher, student = TinyResNet((8, 16), (8, 16)).eval(), TinyResNet((6, 12), (4, 8))
    x = torch.randn(6, 3, 8, 8)
    report = dx.transfer("prune", teacher, student, calibration=[(x, None)])
    assert report.complete and report.counts()["skipped"] == 0
    stream = [v["kept channels"] for k, v in report.importance["channels"].items() if "layer2.0.down" in k]
    assert stream and len(stream[0]) == 12
    for name in ("layer2.0.bn2", "layer2.1.bn2", "layer2.0.down.1"):
        bn_s, bn_t = student.get_submodule(name), teacher.get_submodule(name)
        assert torch.equal(bn_s.running_mean, bn_t.running_mean[stream[0]]), name
    with torch.no_grad():
        assert torch.isfinite(student(x)).all()
    live = [[1, 4, 5, 9, 10, 12, 15], [0, 3, 4, 7, 11]]
    teacher, student = dead_mlp(0, live), mlp((7, 5))
    x = torch.rand(32, 12)
    dx.transfer("prune", teacher, student, calibration=[(x, None)])
    torch.testing.assert_close(student(x), teacher(x), rtol=1e-5, atol=1e-6)


def test_nothing_to_rank_is_an_error():
    t, s = nn.Sequential(nn.Flatten(), nn.Identity()), nn.Sequential(nn.Flatten(), nn.Identity())
    with pytest.raises(TransferError, match="prune: found nothing to rank"):
        dx.transfer("prune", t, s, calibration=[torch.zeros(2, 3)], allow_empty=True)
