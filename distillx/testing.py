"""Test helpers shared by distillx's own tests and by plugin packages' tests.

- :func:`fresh_plugins`: a pytest fixture; every test builds its own plugin manager, without the
  caller's ``DISTILLX_DISABLE_PLUGINS`` (put ``from distillx.testing import fresh_plugins`` in a
  ``conftest.py``; it is autouse there).
- toy models: :class:`CNN` (three conv stages on 1×8×8 images), :class:`TinyTransformer` (q/k/v
  attention blocks), and digits-sized MLP teachers and students (:func:`teacher`, :func:`student`);
- data: :func:`data` (a digits split), :func:`loader`;
- comparisons: :func:`snapshot`/:func:`unchanged` (bitwise: a model did not change), :func:`state`/:func:`same`;
- plugin packages: :func:`assert_discovered` (an installed distribution's entry point provides a name).
- processes: :func:`child_env` (the environment for a torchrun or script child that imports this distillx).

Needs pytest (the ``test`` extra).
"""
from __future__ import annotations

import importlib.metadata
import math
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .data import digits_split
from .plugin import get_plugin_manager, get_registries, reset_plugins


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    """Every test builds its own plugin manager, without the caller's DISTILLX_DISABLE_PLUGINS."""
    monkeypatch.delenv("DISTILLX_DISABLE_PLUGINS", raising=False)
    reset_plugins()
    yield
    reset_plugins()


def assert_discovered(kind: str, name: str, obj, *, entry_point: str, target: str, distribution: str,
                      version: str) -> None:
    """The installed ``distribution`` declares ``entry_point = target`` in group ``distillx``, and through
    it the registry ``kind`` ("methods", "transfers", "kernels", "augmentations") holds ``obj`` under
    ``name``, provided by that entry point with that distribution and version."""
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="distillx")}
    assert entry_point in eps, f"no distillx entry point {entry_point!r}; installed: {sorted(eps)}"
    assert eps[entry_point].value == target and eps[entry_point].dist.metadata["Name"] == distribution
    registry = getattr(get_registries(), kind)
    assert registry.get(name) is obj and registry.provider(name) == entry_point
    info = get_plugin_manager().plugin_info[entry_point]
    assert (info.source, info.distribution, info.version) == ("entrypoint", distribution, version)


# -- models ------------------------------------------------------------------------------------
def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class CNN(nn.Module):
    """3 conv stages on 1×8×8 images, global pooling, linear head (``fc``, whose input is the penultimate).

    ``layer2`` halves the resolution when ``downsample`` (teacher: layer2/layer3 are 4×4); a student
    built with ``downsample=False`` keeps 8×8 maps, so spatial sizes differ between the two.
    """

    def __init__(self, widths=(16, 32, 64), classes: int = 10, downsample: bool = True):
        super().__init__()
        c1, c2, c3 = widths
        self.layer1 = block(1, c1)
        self.layer2 = block(c1, c2, stride=2 if downsample else 1)
        self.layer3 = block(c2, c3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


class SelfAttention(nn.Module):
    """Multi-head self-attention with explicit q/k/v Linear projections; returns ``(context, scores)``
    with the pre-softmax scores ``(B, heads, L, L)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, D = x.shape
        split = lambda t: t.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // self.heads)
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, D)
        return self.out_proj(ctx), scores


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn = SelfAttention(dim, heads)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = self.norm1(x + self.self_attn(x)[0])
        return self.norm2(x + self.mlp(x))


class TinyTransformer(nn.Module):
    """Token classifier: (B, L, in_dim) -> linear embedding -> ``depth`` blocks -> mean pool -> ``head``.

    Attention modules are at ``encoder.layers.<i>.self_attn`` with ``q_proj``/``k_proj``/``v_proj``.
    """

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 3, in_dim: int = 8, classes: int = 5):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.encoder.layers:
            h = layer(h)
        return self.head(h.mean(1))


# -- comparisons -------------------------------------------------------------------------------
def snapshot(model: nn.Module) -> list[torch.Tensor]:
    """Copies of every parameter and buffer, to check bitwise that a model did not change."""
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


def unchanged(model: nn.Module, before: list[torch.Tensor]) -> bool:
    now = [*model.parameters(), *model.buffers()]
    return len(now) == len(before) and all(torch.equal(a, b) for a, b in zip(now, before))


# -- digits data and MLPs (64 features, 10 classes) ---------------------------------------------
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


def child_env(**extra: str) -> dict:
    """The environment for a child process (``torchrun``, a script) that must import this distillx:
    one thread per process, quiet, the directory holding this ``distillx`` first on the path, and no
    inherited rendezvous variables (a test run under torchrun must not leak its own rank to a child)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # PYTHONFAULTHANDLER: a child killed by SIGABRT or SIGSEGV prints every thread's Python stack.
    env = dict(os.environ, OMP_NUM_THREADS="1", DISTILLX_QUIET="1", PYTHONFAULTHANDLER="1")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def leave_process_group() -> None:
    """End a torchrun child script: collect garbage, wait for every rank, then destroy the groups.

    Objects still alive (an FSDP module's device mesh, a DDP reducer) hold the process group; freed
    later, at interpreter exit, gloo's worker threads can abort the process. Collecting them first and
    leaving together (no rank tears its connections down while another still works) avoids that.
    Call it after dropping the script's references to models and Distillers."""
    import gc

    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
