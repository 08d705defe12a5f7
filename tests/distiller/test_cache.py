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


def _cached(tmp_path, methods, student_input=None, x=None):
    x, y = (data(128)[:2]) if x is None else (x, torch.zeros(len(x), dtype=torch.long))
    t = teacher().eval()
    d = dx.Distiller(t, student(hidden=64) if student_input else student(), methods, cache_teacher=True,
                     cache_dir=str(tmp_path / "cache"), cache_dtype="float32", student_input=student_input,
                     progress=False, seed=0)
    d.fit(loader(x, y, 32, seed=1), 1)
    return d, t, x


def _live(t, x, layer):
    with torch.no_grad():
        return t[:layer + 1](x)


@pytest.mark.parametrize("change", ["sld-teacher-layer", "student-input-cut", "inputs"])
def test_a_cache_of_other_captures_or_inputs_is_rebuilt(tmp_path, change):
    """What the cached values depend on besides the teacher's weights: the capture points (a method's
    teacher layer, the student_input cut) and the inputs (another split of the same size)."""
    x = data(128)[0]
    if change == "sld-teacher-layer":
        first = _cached(tmp_path, [dx.method("sld", student="1", teacher="0")])[0]
        d, t, _ = _cached(tmp_path, [dx.method("sld", student="1", teacher="1")])
        key, layer = "sld.pair0", 1
    elif change == "student-input-cut":
        first = _cached(tmp_path, [dx.method("kd")], student_input="0")[0]
        d, t, _ = _cached(tmp_path, [dx.method("kd")], student_input="1")
        key, layer = "student_input", 1
    else:
        first = _cached(tmp_path, [dx.method("sld", student="1", teacher="1")], x=x)[0]
        x = torch.flip(x, [0])  # the same samples in another order: other inputs at each index
        d, t, _ = _cached(tmp_path, [dx.method("sld", student="1", teacher="1")], x=x)
        key, layer = "sld.pair0", 1
    assert first._step.cache.was_built and d._step.cache.was_built
    assert torch.equal(d._step.cache.lookup(torch.arange(len(x)))[key], _live(t, x, layer))
