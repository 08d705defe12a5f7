"""Small models and data for the engine tests (digits: 64 features, 10 classes)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distillx.data import digits_split


def data(n: int = 512):
    split = digits_split(0.25, 0)
    return split.x_train[:n], split.y_train[:n], split.x_test, split.y_test


def loader(x, y, batch_size=64, shuffle=True, seed=None):
    """A DataLoader; with seed its own generator, without it the shuffle comes from the global RNG."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def teacher(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10))


def student(seed=1, hidden=24):
    torch.manual_seed(seed)
    # Dropout: the resumed run must also replay the global generator the student draws from.
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 10))


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
