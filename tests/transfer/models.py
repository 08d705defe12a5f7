"""Teacher/student pairs for the weight-transfer tests: an MLP, a conv net and a small transformer."""
from __future__ import annotations

import torch
from torch import nn


def mlp(hidden=(64, 48), inputs: int = 12, classes: int = 5) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear``; tensors named ``0.weight``, ``2.weight``, ... (head last)."""
    layers, width = [], inputs
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, classes))


class ConvNet(nn.Module):
    """Two conv + BatchNorm stages on 3x8x8 images, global pooling, linear head ``fc``."""

    def __init__(self, c1: int = 16, c2: int = 32, classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """Token classifier: embedding + learned positions, ``nn.TransformerEncoder``, LayerNorm, head."""

    def __init__(self, dim: int = 32, heads: int = 4, ff: int = 64, layers: int = 4, vocab: int = 30,
                 classes: int = 4, max_len: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        return self.head(self.norm(self.encoder(x)).mean(dim=1))


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give norm layers non-trivial weights and running statistics, so copying them is observable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model
