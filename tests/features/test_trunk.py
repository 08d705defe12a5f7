"""Trunk and compose: the teacher run up to a cut, then a student; later layers never run or get saved.

Compiled runs use ``torch.compile(fullgraph=True, backend="aot_eager")``: Dynamo must capture the whole
model in one graph (what "compile-able" means here) without spending a C++ build per test.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import distillx as dx
from distillx.demo import mlp
from distillx.features import CutError, Trunk
from distillx.testing import TinyTransformer


class Stage(nn.Module):
    """Two residual conv blocks; the first may downsample (a ResNet stage)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.short = nn.Conv2d(cin, cout, 1, stride) if (cin, stride) != (cout, 1) else nn.Identity()

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))) + self.short(x))


class ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.stage1, self.stage2, self.stage3 = Stage(8, 8, 1), Stage(8, 16, 2), Stage(16, 32, 2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(torch.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so only a stop hook can cut it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > 0:
            h = h * 2
        return self.c(torch.relu(self.b(h)))


def calls(model: nn.Module) -> dict:
    """Forward calls per submodule path, counted while the returned dict lives."""
    counts: dict = {}
    for name, m in model.named_modules():
        m.register_forward_hook(lambda mod, a, o, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
    return counts


CASES = {  # name -> (teacher, cut, head, inputs, the layers that must not run)
    "sequential": (lambda: mlp((64, 256, 256, 10), 0.5), "4", lambda: mlp((256, 32, 10)), lambda: torch.randn(5, 64),
                   ("5", "6")),
    "resnet": (ResNetLike, "stage2", lambda: nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 10)),
               lambda: torch.randn(3, 1, 8, 8), ("stage3", "fc")),
    "transformer": (lambda: TinyTransformer(depth=3), "encoder.layers.1", lambda: nn.Sequential(nn.Flatten(), nn.Linear(6 * 32, 5)),
                    lambda: torch.randn(2, 6, 8), ("encoder.layers.2", "head")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_compose_is_the_trunk_then_the_student_exactly(name):
    torch.manual_seed(0)
    make_teacher, at, make_head, make_x, later = CASES[name]
    teacher, head, x = make_teacher().eval(), make_head().eval(), make_x()
    composed = dx.compose(teacher, head, at=at).eval()
    assert composed.trunk.kind == ("slice" if name == "sequential" else "graph")
    # the reference: the teacher's own forward, with the cut feature read by a hook
    seen = {}
    handle = dict(teacher.named_modules())[at].register_forward_hook(lambda m, a, o: seen.setdefault("f", o))
    with torch.no_grad():
        teacher(x)
    handle.remove()
    counts = calls(teacher)
    with torch.no_grad():
        out = composed(x)
    assert torch.equal(out, head(seen["f"]))
    assert not any(counts.get(path) for path in later), counts  # the layers after the cut never ran
    saved = composed.trunk.state_dict()
    assert not [k for k in saved if any(f".{path}." in f".{k}" for path in later)]
    compiled = torch.compile(composed, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), out)
    program = torch.export.export(composed, (x,))
    assert torch.equal(program.module()(x), out)


def test_save_and_load_keep_only_the_trunk_up_to_the_cut(tmp_path):
    torch.manual_seed(0)
    teacher, head = ResNetLike().eval(), nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).eval()
    x = torch.randn(2, 1, 8, 8)
    composed = dx.compose(teacher, head, at="stage2")
    path = tmp_path / "composed.pt"
    dx.save_composed(composed, path)
    blob = torch.load(path, weights_only=True)
    assert blob["at"] == "stage2" and not [k for k in blob["state_dict"] if "stage3" in k or ".fc." in k]
    torch.manual_seed(1)
    fresh = dx.load_composed(path, ResNetLike(), nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 10)))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), composed.eval()(x))
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read as a composed model"):
        dx.load_composed(tmp_path / "other.pt", ResNetLike(), head)


def test_untraceable_models_are_stopped_at_the_cut():
    torch.manual_seed(0)
    teacher, x = Branchy().eval(), torch.randn(4, 6)
    trunk = Trunk(teacher, "b", example_inputs=x)
    assert trunk.kind == "stop"
    expected = teacher.b(torch.relu(teacher.a(x)) * (2 if torch.relu(teacher.a(x)).sum() > 0 else 1))
    counts = calls(teacher)
    with torch.no_grad():
        assert torch.equal(trunk(x), expected)
    assert not counts.get("c")
    assert sorted(trunk.state_dict()) == ["body.a.bias", "body.a.weight", "body.b.bias", "body.b.weight"]
    with torch.no_grad():  # the teacher's own forward is untouched by the trunk
        assert teacher(x).shape == (4, 3)


def test_inputs_selections_reductions_and_penultimate():
    torch.manual_seed(0)
    teacher, x = TinyTransformer().eval(), torch.randn(2, 6, 8)
    with torch.no_grad():
        hidden = Trunk(teacher, "head@input")(x)
        assert torch.equal(hidden, Trunk(teacher, "penultimate", example_inputs=x)(x))
        scores = Trunk(teacher, "encoder.layers.0.self_attn:1")(x)
        assert scores.shape == (2, 4, 6, 6)
        pooled = Trunk(teacher, "encoder.layers.2", reduction="l2_normalize")(x)
        assert pooled.shape == (2, 6 * 32) and torch.allclose(pooled.norm(dim=1), torch.ones(2))


def test_bad_cuts_are_named():
    teacher = ResNetLike()
    with pytest.raises(CutError, match="no module at path 'stage9'"):
        Trunk(teacher, "stage9")
    with pytest.raises(CutError, match="needs example_inputs"):
        Trunk(teacher, "penultimate")
    with pytest.raises(TypeError, match="at must be a layer path"):
        Trunk(teacher, "")
    unused = nn.Sequential(nn.Linear(3, 3))
    branchy = Branchy()
    branchy.unused = unused  # a layer the forward pass never calls
    with pytest.raises(CutError, match="never called layer 'unused'"):
        Trunk(branchy, "unused", example_inputs=torch.randn(2, 6))
    with pytest.raises(TypeError, match="at must be a layer path"):
        Trunk(teacher, 3)


def test_compose_report_lists_every_part():
    torch.manual_seed(0)
    teacher, head, x = ResNetLike().eval(), nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).eval(), torch.randn(2, 1, 8, 8)
    report = dx.compose_report(dx.compose(teacher, head, at="stage2"), teacher, x, repeats=2).splitlines()
    assert [line.split("  ")[0].strip() for line in report[1:]] == ["teacher", "trunk up to stage2", "head (student)",
                                                                   "composed"]
    params = {line.split("  ")[0].strip(): int(line.split()[-3].replace(",", "")) for line in report[1:]}
    assert params["composed"] == params["trunk up to stage2"] + params["head (student)"] < params["teacher"] + 2570
