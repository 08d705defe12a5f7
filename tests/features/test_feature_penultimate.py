"""The penultimate shorthand: the input of the output layer, found without knowing its path."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distillx.features import PENULTIMATE, FeatureExtractor, FeatureSpec, find_penultimate

from .models import ConvNet, TinyBert, all_hooks, mlp


class HeadNamedProj(nn.Module):
    """Head named `proj`, followed by parameter-free ops (dropout, log_softmax): output identity fails."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.GELU())
        self.norm = nn.LayerNorm(5)
        self.proj = nn.Linear(5, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return torch.log_softmax(self.drop(self.proj(self.norm(self.body(x)))), dim=-1)


class AuxAfterHead(nn.Module):
    """An auxiliary projection runs *after* the head; the model returns the head's logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)
        self.aux = nn.Linear(5, 2)
        self.aux_value = None

    def forward(self, x):
        h = torch.relu(self.body(x))
        logits = self.out(h)
        self.aux_value = self.aux(h * 2)
        return logits


@pytest.mark.parametrize("factory, path, expected_input", [
    (mlp, "4", lambda m, x: torch.tanh(m[2](torch.relu(m[0](x))))),
    (ConvNet, "fc", lambda m, x: m.layer2(m.layer1(m.stem(x))).mean(dim=(2, 3))),
    (HeadNamedProj, "proj", lambda m, x: m.norm(m.body(x))),
    (AuxAfterHead, "out", lambda m, x: torch.relu(m.body(x))),
    (TinyBert, "classifier", lambda m, x: m.encoder(x)[:, 0]),
], ids=["mlp", "convnet_fc", "head_named_proj", "aux_after_head", "dict_output"])
def test_penultimate_is_the_input_of_the_output_layer(factory, path, expected_input):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(2, 3, 8, 8) if factory is ConvNet else torch.randn(2, 4, 8) if factory is TinyBert \
        else torch.randn(4, 6)
    assert find_penultimate(model, x) == path
    with FeatureExtractor(model, [PENULTIMATE]) as ex:
        assert ex.paths == {PENULTIMATE: None}  # found during the first forward
        model(x)
        assert ex.paths == {PENULTIMATE: path}
        torch.testing.assert_close(ex[PENULTIMATE], expected_input(model, x))
        # later passes hook only the output layer (the discovery hooks are gone)
        assert all_hooks(model) == 2  # the output layer's pre-hook + the clear-on-forward pre-hook
        x2 = torch.randn_like(x)
        model(x2)
        torch.testing.assert_close(ex[PENULTIMATE], expected_input(model, x2))
    assert all_hooks(model) == 0


def test_penultimate_with_reduction_and_teacher_mode():
    torch.manual_seed(0)
    net = ConvNet()
    x = torch.randn(2, 3, 8, 8)
    spec = FeatureSpec(PENULTIMATE, reduction="l2_normalize", key="pen")
    with FeatureExtractor(net, [spec], no_grad=True) as ex:
        net(x)
    feat = net.layer2(net.layer1(net.stem(x))).mean(dim=(2, 3))
    torch.testing.assert_close(ex["pen"], nn.functional.normalize(feat, dim=1))
    assert not ex["pen"].requires_grad


def test_find_penultimate_restores_modes_and_leaves_no_trace():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(), nn.Linear(4, 2))
    model.train()
    model[2].eval()
    before = model[1].running_mean.clone()
    assert find_penultimate(nn.DataParallel(model), torch.randn(8, 4) * 5 + 3) == "3"
    assert [m.training for m in model.modules()] == [True, True, True, False, True]
    assert torch.equal(model[1].running_mean, before)  # ran in eval mode: no statistics update
    assert all_hooks(model) == 0


def test_no_parametrised_module_is_an_error():
    model = nn.Sequential(nn.ReLU(), nn.Flatten())
    with pytest.raises(RuntimeError, match="teacher model: cannot find the penultimate feature: none of its 0 "):
        with FeatureExtractor(model, [PENULTIMATE], name="teacher"):
            model(torch.randn(2, 3))
    assert all_hooks(model) == 0
