"""cache_teacher=True: the teacher runs once over the training set (never during the epochs), the
loss curve equals the live-teacher run's, features are cached too, augmentations that change
inputs are refused."""
from __future__ import annotations

import pytest
import torch

import distillx as dx

from distillx.testing import data, loader, student, teacher


class Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.samples = model, 0, 0

    def forward(self, x):
        self.calls += 1
        self.samples += len(x)
        return self.model(x)


def _run(tmp_path, cache, methods=None, epochs=3):
    x, y, _, _ = data(256)
    t = Counting(teacher().eval())
    s = student()
    methods = methods or [dx.method("kd", T=2.0)]
    d = dx.Distiller(t, s, methods, checkpoint_dir=str(tmp_path), cache_teacher=cache, cache_dtype="float32",
                     progress=False, seed=0)
    torch.manual_seed(0)
    history = d.fit(loader(x, y, 32, seed=1), epochs)
    return d, t, history


def test_cached_run_matches_live_run_and_teacher_runs_once(tmp_path):
    _, live_t, live = _run(tmp_path / "live", False)
    d, cached_t, cached = _run(tmp_path / "cached", True)
    assert live_t.samples == 3 * 256                    # the live teacher sees every batch of every epoch
    assert cached_t.samples == 256                      # the cached one: each sample once, before training
    assert d._step.cache is not None and len(d._step.cache) == 256
    for a, b in zip(live, cached):
        for key in ("loss", "task", "kd"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    # a second fit reuses the cache on disk: the teacher does not run at all
    before = cached_t.samples
    d.fit(loader(*data(256)[:2], 32, seed=1), 1)
    assert cached_t.samples == before


def test_features_are_cached(tmp_path):
    methods = [dx.method("kd"), dx.method("sld", student="1", teacher="model.1")]
    _, live_t, live = _run(tmp_path / "live", False, methods, epochs=2)
    methods = [dx.method("kd"), dx.method("sld", student="1", teacher="model.1")]
    d, cached_t, cached = _run(tmp_path / "cached", True, methods, epochs=2)
    assert sorted(d._step.cache.keys()) == ["logits", "sld.pair0"]
    # each sample once for the cache, plus the one dry-run batch that sizes sld's adapter
    assert cached_t.samples == 256 + 32
    for a, b in zip(live, cached):
        assert b["sld"] == pytest.approx(a["sld"], rel=1e-5)


def test_float16_and_top_k_cache(tmp_path):
    x, y, _, _ = data(128)
    d = dx.Distiller(teacher().eval(), student(), [dx.method("kd", T=2.0)], cache_teacher=True,
                     cache_dir=str(tmp_path / "c"), cache_top_k=3, progress=False)
    history = d.fit(loader(x, y, 32, seed=1), 2)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    looked = d._step.cache.lookup(torch.arange(4))
    assert (torch.isfinite(looked["logits"]).sum(1) == 3).all()


def test_cache_refuses_input_augmentations_and_needs_a_directory():
    with pytest.raises(ValueError, match="augmentations that change the inputs"):
        dx.Distiller(teacher(), student(), [dx.method("kd")], cache_teacher=True, augmentations=["flip"])
    x, y, _, _ = data(64)
    d = dx.Distiller(teacher(), student(), [dx.method("kd")], cache_teacher=True, progress=False)
    with pytest.raises(ValueError, match="cache_dir"):
        d.fit(loader(x, y, 32, seed=0), 1)
