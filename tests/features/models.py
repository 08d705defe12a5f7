"""Small models shared by the feature-extraction tests."""
from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple

import pytest
import torch
from torch import nn

# Importing torch.compile's machinery triggers torch's own deprecation warning for torch.jit.script_method.
TORCH_JIT_DEPRECATION = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

Pair = namedtuple("Pair", ["main", "aux"])


@dataclasses.dataclass
class Out:
    hidden: torch.Tensor
    scores: torch.Tensor


class SelfAttention(nn.Module):
    """Returns a tuple (context, probs) like HF attention modules."""

    def __init__(self, d: int):
        super().__init__()
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)

    def forward(self, hidden_states, attention_mask=None):
        scores = self.query(hidden_states) @ self.key(hidden_states).transpose(-1, -2)
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(-1)
        return probs @ hidden_states, probs


class Attention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.self = SelfAttention(d)

    def forward(self, x, attention_mask=None):
        return self.self(x, attention_mask)


class Layer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.attention = Attention(d)
        self.output = nn.Linear(d, d)

    def forward(self, x, attention_mask=None):
        ctx, _ = self.attention(x, attention_mask=attention_mask)
        return self.output(ctx) + x


class Encoder(nn.Module):
    def __init__(self, d: int, n: int):
        super().__init__()
        self.layer = nn.ModuleList([Layer(d) for _ in range(n)])

    def forward(self, x, attention_mask=None):
        for layer in self.layer:
            x = layer(x, attention_mask=attention_mask)
        return x


class TinyBert(nn.Module):
    """encoder.layer.<i>.attention.self, as in HF BERT; classifier head on token 0."""

    def __init__(self, d: int = 8, n: int = 3, classes: int = 3):
        super().__init__()
        self.encoder = Encoder(d, n)
        self.classifier = nn.Linear(d, classes)

    def forward(self, x, attention_mask=None):
        h = self.encoder(x, attention_mask=attention_mask)
        return {"logits": self.classifier(h[:, 0]), "hidden": h}


class ConvNet(nn.Module):
    """A small ResNet-like net: conv stem, layer1..2 (Sequential of Sequentials), pooling, fc."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
                                    nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()))
        self.layer2 = nn.Sequential(OrderedDict(conv=nn.Conv2d(6, 8, 3, stride=2, padding=1), act=nn.ReLU()))
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


class MultiOut(nn.Module):
    """One submodule per output structure: tuple, dict, namedtuple, dataclass, nested tuple."""

    class Tup(nn.Module):
        def forward(self, x):
            return x + 1, x * 2

    class Dct(nn.Module):
        def forward(self, x):
            return {"a": x - 1, "b": x * 3}

    class NT(nn.Module):
        def forward(self, x):
            return Pair(x * 5, x * 7)

    class DC(nn.Module):
        def forward(self, x):
            return Out(x * 11, x * 13)

    class Nested(nn.Module):
        def forward(self, x):
            return (x, (x * 17, {"deep": x * 19}))

    def __init__(self):
        super().__init__()
        self.tup, self.dct, self.nt, self.dc, self.nested = self.Tup(), self.Dct(), self.NT(), self.DC(), self.Nested()

    def forward(self, x):
        self.tup(x), self.dct(x), self.nt(x), self.dc(x), self.nested(x)
        return x


class FakeDDP(nn.Module):
    """A DDP-like wrapper: the model under ``.module``, forward delegates."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def mlp(d_in: int = 6, hidden: int = 5, classes: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, classes))


def all_hooks(model: nn.Module) -> int:
    """Number of forward hooks and forward pre-hooks on every module of ``model`` (also checks that no
    with_kwargs flag outlives its hook)."""
    for m in model.modules():
        assert set(m._forward_hooks_with_kwargs) <= set(m._forward_hooks)
        assert set(m._forward_pre_hooks_with_kwargs) <= set(m._forward_pre_hooks)
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
