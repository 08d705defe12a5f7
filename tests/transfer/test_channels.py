"""Channel pruning of plain CNNs and MLPs (distillx.transfer.channels) against hand-written references:
the spaces found, activation importance from the test's own forward hooks, top-k indices, and
students written from the teacher by those indices."""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch import nn

from distillx.transfer import TransferError, TransferReport, correspond
from distillx.transfer.apply import copy_or_shrink
from distillx.transfer.channels import channel_groups, channel_importance, channel_indices, top_channels

from .models import mlp, randomize_norms


class PlainCNN(nn.Module):
    """conv-BN-ReLU x3, global average pool, flatten, fc (``pool=False``: flatten the 4x4 map)."""

    def __init__(self, widths=(8, 12, 16), classes=5, pool=True):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1 if pool else 4)
        self.fc = nn.Linear(c * (1 if pool else 16), classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class Block(nn.Module):
    """ResNet basic block; one ReLU module called twice, as in torchvision."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else None

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    def __init__(self, widths=(8, 16), mids=None, classes=5, blocks=(2, 2)):
        super().__init__()
        mids = mids or widths
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layer1 = nn.Sequential(*[Block(widths[0], widths[0]) for _ in range(blocks[0])])
        self.layer2 = nn.Sequential(Block(widths[0], widths[1], 2), *[Block(widths[1], widths[1])
                                                                      for _ in range(blocks[1] - 1)])
        for stage, mid in zip((self.layer1, self.layer2), mids):  # block inner widths apart from the stream
            for b in stage:
                cin = b.conv1.in_channels
                b.conv1, b.bn1 = nn.Conv2d(cin, mid, 3, b.conv1.stride, 1, bias=False), nn.BatchNorm2d(mid)
                b.conv2 = nn.Conv2d(mid, b.conv2.out_channels, 3, 1, 1, bias=False)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(widths[1], classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


def bn(prefix):
    return {(f"{prefix}.{t}", 0) for t in ("weight", "bias", "running_mean", "running_var")}


def groups(plan):
    """{frozenset of members: fixed?} of a plan."""
    return {frozenset(s.members): s.fixed is not None for s in plan.spaces}


IMG = torch.randn(2, 3, 8, 8)


def test_mlp_spaces():
    plan = channel_groups(mlp((16, 10)), torch.randn(2, 12))
    assert groups(plan) == {
        frozenset({("0.weight", 1)}): True,                                   # the model's input
        frozenset({("0.weight", 0), ("0.bias", 0), ("2.weight", 1)}): False,
        frozenset({("2.weight", 0), ("2.bias", 0), ("4.weight", 1)}): False,
        frozenset({("4.weight", 0), ("4.bias", 0)}): True,                    # logits
    }
    assert "input" in plan.space_of("0.weight", 1).fixed and "output" in plan.space_of("4.bias", 0).fixed


@pytest.mark.parametrize("pool", [True, False])
def test_plain_cnn_spaces_follow_batchnorm_and_a_flatten_after_global_pooling(pool):
    plan = channel_groups(PlainCNN(pool=pool), IMG)
    f = "features"
    expected = {
        frozenset({(f"{f}.0.weight", 1)}): True,
        frozenset({(f"{f}.0.weight", 0), (f"{f}.0.bias", 0), (f"{f}.3.weight", 1)} | bn(f"{f}.1")): False,
        frozenset({(f"{f}.3.weight", 0), (f"{f}.3.bias", 0), (f"{f}.6.weight", 1)} | bn(f"{f}.4")): False,
        frozenset({("fc.weight", 0), ("fc.bias", 0)}): True,
    }
    last = {(f"{f}.6.weight", 0), (f"{f}.6.bias", 0)} | bn(f"{f}.7")
    if pool:  # 1x1 map: fc's inputs are the channels
        expected[frozenset(last | {("fc.weight", 1)})] = False
    else:  # 16 positions per channel in fc's inputs: both sides fixed, and apart
        expected[frozenset(last)] = True
        expected[frozenset({("fc.weight", 1)})] = True
        assert "merging the channels" in plan.space_of(f"{f}.6.weight", 0).fixed
    assert groups(plan) == expected


def resnet_groups(blocks=(2, 2)):
    """The hand-written channel spaces of TinyResNet."""
    stream1 = {("stem.0.weight", 0)} | bn("stem.1") | {("layer2.0.conv1.weight", 1), ("layer2.0.down.0.weight", 1)}
    stream2 = {("layer2.0.down.0.weight", 0), ("fc.weight", 1)} | bn("layer2.0.down.1")
    mids = []
    for stage, stream, n in (("layer1", stream1, blocks[0]), ("layer2", stream2, blocks[1])):
        for i in range(n):
            p = f"{stage}.{i}"
            stream |= {(f"{p}.conv2.weight", 0)} | bn(f"{p}.bn2")
            if not (stage == "layer2" and i == 0):
                stream.add((f"{p}.conv1.weight", 1))
            mids.append(frozenset({(f"{p}.conv1.weight", 0), (f"{p}.conv2.weight", 1)} | bn(f"{p}.bn1")))
    return {frozenset(stream1): False, frozenset(stream2): False, **{m: False for m in mids},
            frozenset({("stem.0.weight", 1)}): True, frozenset({("fc.weight", 0), ("fc.bias", 0)}): True}


def test_resnet_residual_adds_join_every_block_of_a_stage_and_its_downsample():
    assert groups(channel_groups(TinyResNet(), IMG)) == resnet_groups()


# -- importance -----------------------------------------------------------------------------------
def mean_abs(outputs, dim=1):
    x = torch.cat([o.to(torch.float64) for o in outputs]).abs()
    return x.movedim(dim, -1).reshape(-1, x.shape[dim]).mean(0)


def unit(v):
    return v / v.mean()


def record(model, names, batches):
    """Outputs of the named modules, every call in order, over ``batches`` (forward hooks)."""
    seen = defaultdict(list)
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: seen[n].append(o.detach().clone())) for n in names]
    with torch.no_grad():
        for x in batches:
            model.eval()(x)
    for h in handles:
        h.remove()
    return seen


def calibration(shape, sizes=(5, 3), as_pairs=True):
    xs = [torch.randn(n, *shape) for n in sizes]
    return xs, ([(x, torch.zeros(len(x))) for x in xs] if as_pairs else xs)


@pytest.mark.parametrize("seed", [0, 1])
def test_mlp_importance_is_the_mean_absolute_relu_output(seed):
    torch.manual_seed(seed)
    model = mlp((16, 10))
    xs, batches = calibration((12,), as_pairs=bool(seed))  # (inputs, targets) pairs and bare tensors
    plan = channel_groups(model, xs[0])
    scores = channel_importance(model, plan, batches)
    seen = record(model, ["1", "3"], xs)
    assert set(scores) == {plan.space_of("0.weight", 0).index, plan.space_of("2.weight", 0).index}
    for relu, producer in (("1", "0.weight"), ("3", "2.weight")):
        torch.testing.assert_close(scores[plan.space_of(producer, 0).index], unit(mean_abs(seen[relu])),
                                   rtol=1e-10, atol=0)


def test_cnn_importance_averages_over_batch_and_positions():
    torch.manual_seed(2)
    model = randomize_norms(PlainCNN())
    xs, batches = calibration((3, 8, 8))
    plan = channel_groups(model, IMG)
    scores = channel_importance(model, plan, batches, max_batches=1)  # only the first batch
    seen = record(model, ["features.2", "features.5", "features.8"], xs[:1])
    for relu, conv in (("features.2", "features.0"), ("features.5", "features.3"), ("features.8", "features.6")):
        torch.testing.assert_close(scores[plan.space_of(f"{conv}.weight", 0).index], unit(mean_abs(seen[relu])),
                                   rtol=1e-10, atol=0)


def test_resnet_stream_importance_sums_each_block_output_scaled_to_mean_one():
    torch.manual_seed(3)
    model = randomize_norms(TinyResNet())
    xs, batches = calibration((3, 8, 8))
    plan = channel_groups(model, IMG)
    scores = channel_importance(model, plan, batches)
    relus = ["stem.2"] + [f"layer{s}.{i}.relu" for s in (1, 2) for i in (0, 1)]
    seen = record(model, relus, xs)
    inner = {n: seen[n][0::2] for n in relus[1:]}  # a block's shared ReLU: first its inner output,
    out = {n: seen[n][1::2] for n in relus[1:]}    # then the block's output
    expected = {
        "stem.0.weight": unit(mean_abs(seen["stem.2"])) + unit(mean_abs(out["layer1.0.relu"]))
        + unit(mean_abs(out["layer1.1.relu"])),
        "layer2.0.down.0.weight": unit(mean_abs(out["layer2.0.relu"])) + unit(mean_abs(out["layer2.1.relu"])),
        **{f"{n[:-5]}.conv1.weight": unit(mean_abs(inner[n])) for n in relus[1:]},
    }
    for member, value in expected.items():
        torch.testing.assert_close(scores[plan.space_of(member, 0).index], value, rtol=1e-10, atol=0)


def test_calibration_without_batches_is_an_error_naming_calibration():
    model = mlp((4,))
    plan = channel_groups(model, torch.randn(2, 12))
    for empty in ([], None, iter(())):
        with pytest.raises(TransferError, match="calibration"):
            channel_importance(model, plan, empty)


def test_a_plan_of_another_model_is_refused():
    plan = channel_groups(mlp((16,)), torch.randn(2, 12))
    with pytest.raises(TransferError, match="another model: '0.weight' is"):
        channel_importance(mlp((8,)), plan, [torch.randn(2, 12)])


# -- indices and pruned students --------------------------------------------------------------------
def test_top_channels_keeps_the_highest_with_ties_to_the_lower_index_sorted():
    assert top_channels(torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]), 2) == [1, 2]
    assert top_channels(torch.tensor([0.0, -0.0, 0.0]), 2) == [0, 1]
    for seed in range(5):
        s = torch.rand(20, generator=torch.Generator().manual_seed(seed))
        assert top_channels(s, 7) == sorted(torch.topk(s, 7).indices.tolist())


def prune(teacher, student, example, batches):
    t_plan, s_plan = channel_groups(teacher, example), channel_groups(student, example)
    scores = channel_importance(teacher, t_plan, batches)
    chosen = channel_indices(t_plan, s_plan, scores)
    report = TransferReport.for_model("test", student)
    copy_or_shrink(student, correspond(teacher, student), report, None, indices=chosen.by_tensor())
    return t_plan, scores, chosen, report


def test_cnn_student_keeps_the_top_channels_with_their_batchnorm_statistics():
    torch.manual_seed(4)
    teacher, student = randomize_norms(PlainCNN((8, 12, 16))), PlainCNN((5, 12, 9))
    xs, batches = calibration((3, 8, 8))
    plan, scores, chosen, report = prune(teacher, student, IMG, batches)
    assert not chosen.skipped and report.counts()["skipped"] == 0
    kept = {}
    for conv, bn_path, k in (("features.0", "features.1", 5), ("features.6", "features.7", 9)):
        kept[conv] = sorted(torch.topk(scores[plan.space_of(f"{conv}.weight", 0).index], k).indices.tolist())
        assert chosen.indices[(f"{conv}.weight", 0)] == kept[conv]
        assert torch.equal(student.get_submodule(conv).weight, teacher.get_submodule(conv).weight[kept[conv]])
        for t in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(student.get_submodule(bn_path), t),
                               getattr(teacher.get_submodule(bn_path), t)[kept[conv]])
    assert chosen.indices[("features.3.weight", 0)] == list(range(12))  # equal widths keep every channel
    assert torch.equal(student.features[3].weight, teacher.features[3].weight[:, kept["features.0"]])
    assert torch.equal(student.fc.weight, teacher.fc.weight[:, kept["features.6"]])
    assert torch.isfinite(student(xs[0])).all()


def test_resnet_student_keeps_the_same_stream_channels_in_every_block():
    torch.manual_seed(5)
    teacher, student = randomize_norms(TinyResNet((8, 16), (8, 16))), TinyResNet((6, 10), (4, 12))
    xs, batches = calibration((3, 8, 8))
    _, _, chosen, report = prune(teacher, student, IMG, batches)
    assert not chosen.skipped and report.counts()["skipped"] == 0
    stream1 = [("stem.1.running_mean", 0), ("layer1.0.bn2.weight", 0), ("layer1.1.bn2.running_var", 0),
               ("layer1.1.conv1.weight", 1), ("layer2.0.conv1.weight", 1), ("layer2.0.down.0.weight", 1)]
    stream2 = [("layer2.0.down.1.running_mean", 0), ("layer2.0.bn2.weight", 0), ("layer2.1.bn2.bias", 0),
               ("layer2.1.conv1.weight", 1), ("fc.weight", 1)]
    for stream, k in ((stream1, 6), (stream2, 10)):
        kept = {tuple(chosen.indices[m]) for m in stream}
        assert len(kept) == 1 and len(next(iter(kept))) == k
    keep = chosen.indices[("layer2.1.bn2.bias", 0)]
    assert torch.equal(student.layer2[1].bn2.running_mean, teacher.layer2[1].bn2.running_mean[keep])
    assert torch.isfinite(student(xs[0])).all()


def test_a_shallower_student_reads_its_blocks_from_the_teacher_through_mapping():
    torch.manual_seed(6)
    teacher, student = TinyResNet(blocks=(3, 2)), TinyResNet((6, 16), blocks=(2, 2))
    with torch.no_grad():  # inner channels of constant activation: 1 (live) or 0; blocks 1 and 2 differ
        for block, dead in ((1, [0, 1]), (2, [6, 7])):
            norm = teacher.layer1[block].bn1
            norm.weight.zero_()
            norm.bias.fill_(1.0)
            norm.bias[dead] = 0.0
    t_plan, s_plan = channel_groups(teacher, IMG), channel_groups(student, IMG)
    assert groups(s_plan) == resnet_groups((2, 2))
    scores = channel_importance(teacher, t_plan, [torch.randn(4, 3, 8, 8)])
    mapping = {m.name: m.teacher_name for m in correspond(teacher, student, layers="uniform") if m.teacher_name}
    chosen = channel_indices(t_plan, s_plan, scores, mapping)
    assert mapping["layer1.1.conv1.weight"] == "layer1.2.conv1.weight"  # student block 1 <- teacher block 2
    stream = top_channels(scores[t_plan.space_of("stem.0.weight", 0).index], 6)
    assert chosen.indices[("layer1.1.bn2.weight", 0)] == stream  # the stream: a subset of the teacher's space
    assert chosen.indices[("layer1.1.bn1.running_var", 0)] == [0, 1, 2, 3, 4, 5]  # teacher block 2's live ones
    assert not chosen.skipped


def dead_mlp(seed, live):
    """mlp((16, 12)) whose hidden units outside ``live`` are exactly zero, and whose live units are
    positive on every input in [0, 1]^12 (biases above the bound on |W x|), so importance must
    keep exactly the live ones."""
    torch.manual_seed(seed)
    model = mlp((16, 12))
    with torch.no_grad():
        bound = torch.ones(12)  # the largest input
        for layer, idx in zip((model[0], model[2]), live):
            drop = torch.ones(layer.out_features, dtype=torch.bool)
            drop[idx] = False
            layer.weight[drop] = 0
            layer.bias.copy_(torch.where(drop, 0.0, layer.weight.abs() @ bound + 0.1))
            bound = layer.weight.abs() @ bound + layer.bias
    return model


@pytest.mark.parametrize("seed", range(3))
def test_pruning_a_teacher_with_dead_units_reproduces_it_exactly(seed):
    g = torch.Generator().manual_seed(seed)
    live = [sorted(torch.randperm(16, generator=g)[:7].tolist()), sorted(torch.randperm(12, generator=g)[:5].tolist())]
    teacher, student = dead_mlp(seed, live), mlp((7, 5))
    x = torch.rand(32, 12, generator=g)
    _, _, chosen, report = prune(teacher, student, x, [(x, None)])
    assert chosen.indices[("0.weight", 0)] == live[0] and chosen.indices[("4.weight", 1)] == live[1]
    assert report.counts()["skipped"] == 0
    torch.testing.assert_close(student(x), teacher(x), rtol=1e-5, atol=1e-6)


def test_a_wider_student_or_a_changed_fixed_width_is_reported_not_raised():
    teacher, student = mlp((16, 10), inputs=12), mlp((20, 6), inputs=9)
    t_plan, s_plan = channel_groups(teacher, torch.randn(2, 12)), channel_groups(student, torch.randn(2, 9))
    chosen = channel_indices(t_plan, s_plan, channel_importance(teacher, t_plan, [torch.randn(4, 12)]))
    assert "wider than the teacher's (20 > 16)" in chosen.skipped["0.bias"]
    assert "must keep their number" in chosen.skipped["0.weight"] and "model's input" in chosen.skipped["0.weight"]
    assert "2.weight" in chosen.skipped and ("2.weight", 0) not in chosen.indices  # a tensor is all or nothing
    assert chosen.indices[("2.bias", 0)] == chosen.indices[("4.weight", 1)] and len(chosen.indices[("2.bias", 0)]) == 6
