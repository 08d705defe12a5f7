"""The offline teacher cache: build once, memory-map, look up by sample index."""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from distillx.functional import kd_loss
from distillx.teacher_cache import (FORMAT_VERSION, MANIFEST, CacheMismatchError, IndexedDataset, TeacherCache, indexed_loader,
                                    teacher_fingerprint)

N, D, H, C = 50, 8, 16, 10


def make_data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g))


def make_teacher(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Dropout(0.5), nn.Linear(H, C)).eval()


class Counter:
    """Counts the samples the teacher's forward sees."""

    def __init__(self, model):
        self.samples = 0
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        self.samples += args[0].shape[0]


def live(teacher, x):
    with torch.no_grad():
        return teacher(x)


def reference(teacher, x, batch_size):
    """The teacher's logits computed with the build's batching (index order)."""
    return torch.cat([live(teacher, x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@pytest.fixture
def data():
    return make_data()


@pytest.fixture
def teacher():
    return make_teacher()


def test_float32_lookup_equals_live_teacher(tmp_path, data, teacher):
    loader = DataLoader(data, batch_size=16)
    cache = TeacherCache.build(teacher, loader, tmp_path / "c", dtype=torch.float32)
    x = data.tensors[0]
    out = cache.lookup(torch.arange(N))
    assert out["logits"].dtype == torch.float32
    assert torch.equal(out["logits"], reference(teacher, x, 16))
    assert torch.allclose(out["logits"], live(teacher, x), rtol=1e-5, atol=1e-6)
    assert len(cache) == N and cache.keys() == ["logits"] and cache.shape("logits") == (C,)
    assert cache.directory == str((tmp_path / "c").resolve()) and cache.was_built
    # arbitrary order and repeats, as a list or numpy array too
    idx = torch.tensor([7, 3, 3, 49, 0])
    assert torch.equal(cache.lookup(idx)["logits"], out["logits"][idx])
    assert torch.equal(cache.lookup([7, 3, 3, 49, 0])["logits"], out["logits"][idx])
    assert torch.equal(cache[np.array([7, 3])]["logits"], out["logits"][[7, 3]])


def test_float16_within_rounding(tmp_path, data, teacher):
    cache = TeacherCache.build(teacher, DataLoader(data, batch_size=16), tmp_path)
    assert cache.dtype == torch.float16 and cache.array("logits").dtype == np.float16
    got = cache.lookup(torch.arange(N))["logits"]
    ref = reference(teacher, data.tensors[0], 16)
    assert got.dtype == torch.float32
    assert torch.equal(got, ref.half().float())  # exactly the float16 rounding of the live output
    torch.testing.assert_close(got, ref, rtol=2 ** -10, atol=1e-4)


def test_shuffled_indexed_batches_align(tmp_path, data, teacher):
    loader = DataLoader(data, batch_size=12, shuffle=True, generator=torch.Generator().manual_seed(3))
    cache = TeacherCache.build(teacher, loader, tmp_path, dtype=torch.float32)
    indexed = indexed_loader(loader)
    assert isinstance(indexed.dataset, IndexedDataset) and indexed.sampler is loader.sampler
    assert indexed.batch_size == 12 and indexed.drop_last is False
    seen = []
    for indices, inputs, targets in indexed:
        assert indices.dtype == torch.int64
        assert torch.equal(inputs, data.tensors[0][indices]) and torch.equal(targets, data.tensors[1][indices])
        torch.testing.assert_close(cache.lookup(indices)["logits"], live(teacher, inputs), rtol=1e-6, atol=1e-6)
        seen.extend(indices.tolist())
    assert seen != list(range(N)) and sorted(seen) == list(range(N))  # shuffled, every sample once

    # Same shuffling as the plain loader when both get the same seeded generator.
    def order(batches):  # the targets of two epochs
        return [batch[-1].tolist() for _ in range(2) for batch in batches]

    plain = DataLoader(data, batch_size=12, shuffle=True, generator=torch.Generator().manual_seed(5))
    twin = DataLoader(data, batch_size=12, shuffle=True, generator=torch.Generator().manual_seed(5))
    assert order(plain) == order(indexed_loader(twin))


def test_indexed_loader_keeps_loader_semantics(data):
    # drop_last and batch size
    loader = DataLoader(data, batch_size=16, drop_last=True)
    sizes = [len(b[0]) for b in indexed_loader(loader)]
    assert sizes == [16, 16, 16]
    # a custom collate_fn sees the original items; a non-sequence result comes after the indices
    def collate(items):
        return {"x": torch.stack([x for x, _ in items]), "y": torch.stack([y for _, y in items])}
    indices, batch = next(iter(indexed_loader(DataLoader(data, batch_size=4, collate_fn=collate))))
    assert indices.tolist() == [0, 1, 2, 3] and torch.equal(batch["x"], data.tensors[0][:4])
    # a custom batch sampler
    batches = [[5, 1], [0, 9, 2]]
    out = [(i.tolist(), y.tolist()) for i, x, y in indexed_loader(DataLoader(data, batch_sampler=batches))]
    assert out == [([5, 1], data.tensors[1][[5, 1]].tolist()), ([0, 9, 2], data.tensors[1][[0, 9, 2]].tolist())]
    # automatic batching off: one sample at a time
    i, x, y = next(iter(indexed_loader(DataLoader(data, batch_size=None))))
    assert int(i) == 0 and torch.equal(x, data.tensors[0][0])
    # the item layout and picklability (worker processes)
    item = IndexedDataset(data)[3]
    assert isinstance(item, tuple) and len(item) == 3 and item[0] == 3
    assert torch.equal(item[1], data.tensors[0][3]) and torch.equal(item[2], data.tensors[1][3])
    back = pickle.loads(pickle.dumps(item))
    assert back[0] == 3 and torch.equal(back[1], item[1])
    pickle.dumps(indexed_loader(loader).collate_fn)


def test_worker_processes(tmp_path, data, teacher):
    loader = DataLoader(data, batch_size=16, shuffle=True, num_workers=1,
                        generator=torch.Generator().manual_seed(0))
    cache = TeacherCache.build(teacher, loader, tmp_path, dtype=torch.float32)
    for indices, inputs, _ in indexed_loader(loader):
        assert torch.equal(inputs, data.tensors[0][indices])
        torch.testing.assert_close(cache.lookup(indices)["logits"], live(teacher, inputs), rtol=1e-6, atol=1e-6)


def test_indexed_loader_rejects_non_map_style(data):
    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(*data.tensors)

    with pytest.raises(ValueError, match="IterableDataset.*no stable index"):
        indexed_loader(DataLoader(Stream(), batch_size=4))
    with pytest.raises(ValueError, match="expected a torch.utils.data.DataLoader.*got list.*no sample indices"):
        indexed_loader([(data.tensors[0][:4], data.tensors[1][:4])])
    with pytest.raises(ValueError, match="got generator"):
        indexed_loader(b for b in [])
    with pytest.raises(ValueError, match="IterableDataset"):
        TeacherCache.build(make_teacher(), DataLoader(Stream(), batch_size=4), "unused")


def test_empty_dataset_is_a_clear_error(tmp_path, teacher):
    empty = TensorDataset(torch.zeros(0, D), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        TeacherCache.build(teacher, DataLoader(empty, batch_size=4), tmp_path)
    with pytest.raises(ValueError, match="empty"):
        TeacherCache.build_or_open(teacher, DataLoader(empty, batch_size=4), tmp_path)
    assert not os.path.exists(tmp_path / MANIFEST)


def test_top_k_reconstruction(tmp_path, data, teacher):
    k = 3
    cache = TeacherCache.build(teacher, DataLoader(data, batch_size=16), tmp_path, dtype=torch.float32, top_k=k)
    assert cache.keys() == ["logits", "topk_values", "topk_indices"] and cache.top_k == k
    ref = reference(teacher, data.tensors[0], 16)
    idx = torch.tensor([4, 0, 31])
    out = cache.lookup(idx)
    dense, values, classes = out["logits"], out["topk_values"], out["topk_indices"]
    assert dense.shape == (3, C) and values.shape == (3, k) and classes.dtype == torch.int64
    top_vals, top_idx = ref[idx].topk(k, dim=-1)
    assert torch.equal(values, top_vals) and torch.equal(classes, top_idx)
    keep = torch.zeros(3, C, dtype=torch.bool).scatter_(1, top_idx, True)
    assert torch.equal(dense[keep], ref[idx][keep])
    assert torch.all(dense[~keep] == -torch.inf)
    probs = torch.softmax(ref[idx], -1)
    renorm = torch.where(keep, probs, 0) / torch.where(keep, probs, 0).sum(-1, keepdim=True)
    torch.testing.assert_close(torch.softmax(dense, -1), renorm)
    # kd_loss takes the -inf teacher logits: finite loss
    student = torch.randn(3, C, requires_grad=True)
    loss = kd_loss(student, dense, temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    # only the top-k is stored, the indices as int32
    assert cache.array("topk_values").shape == (N, k) and cache.array("topk_indices").dtype == np.int32
    assert cache.shape("logits") == (C,)
    assert cache.lookup(idx, keys=["topk_values"]).keys() == {"topk_values"}
    with pytest.raises(ValueError, match="larger than the number of classes"):
        TeacherCache.build(teacher, DataLoader(data, batch_size=16), tmp_path / "x", top_k=C + 1)


def test_captured_features_and_call_counts(tmp_path, data, teacher):
    counter = Counter(teacher)
    hidden = {}
    handle = teacher[1].register_forward_hook(lambda m, a, out: hidden.__setitem__("h", out))

    def capture(inputs):
        logits = teacher(inputs)
        return {"logits": logits, "kd.hidden": hidden["h"], "at#2.sum": hidden["h"].sum(1, keepdim=True)}

    loader = DataLoader(data, batch_size=16, shuffle=True)
    cache = TeacherCache.build(teacher, loader, tmp_path, capture=capture, dtype=torch.float32)
    assert counter.samples == N and counter.calls == 4  # once per sample
    assert cache.keys() == ["logits", "kd.hidden", "at#2.sum"]
    assert cache.shape("kd.hidden") == (H,) and cache.shape("at#2.sum") == (1,)
    for indices, inputs, _ in indexed_loader(loader):
        calls = counter.calls
        out = cache.lookup(indices)
        assert counter.calls == calls  # lookups never run the teacher
        with torch.no_grad():
            h = teacher[1](teacher[0](inputs))
        torch.testing.assert_close(out["kd.hidden"], h, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["at#2.sum"], h.sum(1, keepdim=True), rtol=1e-6, atol=1e-5)
    handle.remove()
    counter.handle.remove()
    # the file names are sanitised, the manifest keeps the keys
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["keys"] == ["logits", "kd.hidden", "at#2.sum"]
    assert all("#" not in t["file"] for t in manifest["tensors"].values())


def test_teacher_mode_restored_and_eval_outputs(tmp_path, data):
    teacher = make_teacher().train()  # dropout active: the cache must hold eval() outputs
    teacher[1].eval()  # a mixed-mode model comes back exactly as it was
    cache = TeacherCache.build(teacher, DataLoader(data, batch_size=25), tmp_path, dtype=torch.float32)
    assert teacher.training and not teacher[1].training and teacher[2].training
    teacher.eval()
    assert torch.equal(cache.lookup(torch.arange(N))["logits"], reference(teacher, data.tensors[0], 25))
    assert all(p.grad is None for p in teacher.parameters())


def test_reopen_and_mismatches(tmp_path, data, teacher):
    loader = DataLoader(data, batch_size=16)
    built = TeacherCache.build(teacher, loader, tmp_path)
    fp = teacher_fingerprint(teacher, N)
    assert built.fingerprint == fp
    cache = TeacherCache.open(tmp_path, expect_fingerprint=fp, expect_len=N)
    assert not cache.was_built and len(cache) == N
    assert torch.equal(cache.lookup(torch.arange(N))["logits"], built.lookup(torch.arange(N))["logits"])

    other = make_teacher(seed=1)
    other_fp = teacher_fingerprint(other, N)
    with pytest.raises(CacheMismatchError, match=rf"fingerprint: expected '{other_fp}', found '{fp}'"):
        TeacherCache.open(tmp_path, expect_fingerprint=other_fp)
    with pytest.raises(CacheMismatchError, match=r"number of samples: expected 60 .*found 50"):
        TeacherCache.open(tmp_path, expect_len=60)
    with pytest.raises(CacheMismatchError, match=r"top_k: expected 3, found None"):
        TeacherCache.open(tmp_path, expect_top_k=3)
    with pytest.raises(CacheMismatchError, match=r"dtype: expected float32, found float16"):
        TeacherCache.open(tmp_path, expect_dtype=torch.float32)
    with pytest.raises(CacheMismatchError, match=r"keys: expected \['feat'\]"):
        TeacherCache.open(tmp_path, expect_keys=["logits", "feat"])
    # the fingerprint sees buffers/weights and the dataset length
    assert teacher_fingerprint(teacher, N + 1) != fp
    assert teacher_fingerprint(teacher, N, extra="cifar10") != fp

    data_file = tmp_path / cache.manifest["tensors"]["logits"]["file"]
    data_file.write_bytes(data_file.read_bytes()[:-2])
    with pytest.raises(CacheMismatchError, match=r"000-logits.bin.*has 998 bytes, expected 1000"):
        TeacherCache.open(tmp_path)
    data_file.unlink()
    with pytest.raises(CacheMismatchError, match=r"data file '000-logits.bin' of 'logits' is missing"):
        TeacherCache.open(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(CacheMismatchError, match="manifest.json is corrupt"):
        TeacherCache.open(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "distillx.teacher_cache", "version": FORMAT_VERSION}))
    with pytest.raises(CacheMismatchError, match=r"corrupt.*'num_samples'"):
        TeacherCache.open(tmp_path)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(CacheMismatchError, match="manifest.json is missing"):
        TeacherCache.open(tmp_path)
    with pytest.raises(CacheMismatchError, match="does not exist"):
        TeacherCache.open(tmp_path / "nowhere")
    assert issubclass(CacheMismatchError, ValueError)


def test_build_or_open_reuses_and_rebuilds(tmp_path, data, teacher):
    loader = DataLoader(data, batch_size=16)
    counter = Counter(teacher)
    first = TeacherCache.build_or_open(teacher, loader, tmp_path)
    assert first.was_built and counter.samples == N
    again = TeacherCache.build_or_open(teacher, loader, tmp_path)
    assert not again.was_built and counter.samples == N  # reused: the teacher did not run
    topk = TeacherCache.build_or_open(teacher, loader, tmp_path, top_k=2)  # other settings: rebuilt
    assert topk.was_built and topk.top_k == 2 and counter.samples == 2 * N
    counter.handle.remove()
    with torch.no_grad():
        teacher[0].weight.add_(1.0)  # new teacher weights: rebuilt
    rebuilt = TeacherCache.build_or_open(teacher, loader, tmp_path, top_k=2)
    assert rebuilt.was_built and rebuilt.fingerprint == teacher_fingerprint(teacher, N)
    # a caller's fingerprint replaces the default
    mine = TeacherCache.build_or_open(teacher, loader, tmp_path, top_k=2, fingerprint="my-data-v1")
    assert mine.was_built and mine.fingerprint == "my-data-v1"
    assert not TeacherCache.build_or_open(teacher, loader, tmp_path, top_k=2, fingerprint="my-data-v1").was_built
    # a different dataset length: rebuilt
    short = TeacherCache.build_or_open(teacher, DataLoader(make_data(40), batch_size=16), tmp_path)
    assert short.was_built and len(short) == 40
    # stale data files of the old cache are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000-logits.bin", MANIFEST]


def test_interrupted_build_leaves_no_manifest(tmp_path, data, teacher):
    loader = DataLoader(data, batch_size=16)
    calls = []

    def failing(inputs):
        calls.append(len(inputs))
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return {"logits": teacher(inputs)}

    TeacherCache.build(teacher, loader, tmp_path)  # an older complete cache is replaced, not kept
    with pytest.raises(RuntimeError, match="simulated"):
        TeacherCache.build(teacher, loader, tmp_path, capture=failing)
    assert not (tmp_path / MANIFEST).exists()
    assert list(tmp_path.iterdir()) == []  # partial data files removed too
    with pytest.raises(CacheMismatchError, match="manifest.json is missing"):
        TeacherCache.open(tmp_path)
    cache = TeacherCache.build_or_open(teacher, loader, tmp_path)
    assert cache.was_built and (tmp_path / MANIFEST).exists()


def test_memory_mapped_storage(tmp_path, data, teacher):
    cache = TeacherCache.build(teacher, DataLoader(data, batch_size=16), tmp_path, dtype=torch.float32)
    arr = cache.array("logits")
    assert isinstance(arr, np.memmap) and arr.shape == (N, C) and not arr.flags.writeable
    path = tmp_path / cache.manifest["tensors"]["logits"]["file"]
    assert os.path.getsize(path) == N * C * 4
    assert cache.nbytes == N * C * 4 + os.path.getsize(tmp_path / MANIFEST)
    # the raw layout is documented: numpy.memmap of the manifest's shape/dtype (or torch.from_file)
    raw = torch.from_file(str(path), shared=False, size=N * C, dtype=torch.float32).view(N, C)
    assert torch.equal(raw[[2, 5]], cache.lookup([2, 5])["logits"])
    # lookups are copies of the asked rows, safe to modify
    out = cache.lookup([1])["logits"]
    out.zero_()
    assert not torch.all(cache.lookup([1])["logits"] == 0)
    # a rebuild never truncates files an open cache still maps
    old = cache.lookup(torch.arange(N))["logits"]
    TeacherCache.build(make_teacher(seed=2), DataLoader(data, batch_size=16), tmp_path, dtype=torch.float32)
    assert torch.equal(cache.lookup(torch.arange(N))["logits"], old)
    # pickling sends the path, not the data
    clone = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 4000 and isinstance(clone.array("logits"), np.memmap)


def test_lookup_and_build_errors(tmp_path, data, teacher):
    loader = DataLoader(data, batch_size=16)
    cache = TeacherCache.build(teacher, loader, tmp_path / "ok")
    with pytest.raises(IndexError, match="sample index 50 is out of range for a teacher cache of 50 samples"):
        cache.lookup(torch.tensor([1, 50]))
    with pytest.raises(IndexError, match="-1"):
        cache.lookup([-1])
    with pytest.raises(TypeError, match="integer"):
        cache.lookup(torch.tensor([1.0]))
    with pytest.raises(KeyError, match="feat"):
        cache.lookup([0], keys=["feat"])
    with pytest.raises(ValueError, match="dtype must be"):
        TeacherCache.build(teacher, loader, tmp_path / "a", dtype=torch.bfloat16)
    # batch-level statistics cannot be cached per sample
    with pytest.raises(ValueError, match=r"'stats' has shape \(3,\).*per-sample"):
        TeacherCache.build(teacher, loader, tmp_path / "b",
                           capture=lambda x: {"logits": teacher(x), "stats": torch.zeros(3)})
    with pytest.raises(TypeError, match="'pair' is a tuple"):
        TeacherCache.build(teacher, loader, tmp_path / "c",
                           capture=lambda x: {"logits": teacher(x), "pair": (x, x)})
    # float16 overflow is named
    with pytest.raises(ValueError, match=r"'logits' overflows float16.*dtype=torch.float32"):
        TeacherCache.build(teacher, loader, tmp_path / "d", capture=lambda x: {"logits": teacher(x) * 1e6})
    for d in "abcd":
        assert not (tmp_path / d / MANIFEST).exists()


def test_capture_with_feature_extractor(tmp_path, data, teacher):
    """The integration shape: a closure running the teacher with distillx's feature hooks."""
    from distillx.features import FeatureExtractor, FeatureSpec

    requests = {"fitnet.hint": "1", "at.map": FeatureSpec("0", reduction="l2_normalize")}
    with FeatureExtractor(teacher, requests, name="teacher", detach=True) as ex:
        def capture(inputs):
            return {"logits": teacher(inputs), **ex.collect()}

        cache = TeacherCache.build(teacher, DataLoader(data, batch_size=16), tmp_path, capture=capture,
                                   dtype=torch.float32, top_k=4)
    assert cache.keys()[:3] == ["logits", "topk_values", "topk_indices"]
    assert sorted(cache.keys()[3:]) == ["at.map", "fitnet.hint"]  # in the order capture returned them
    x = data.tensors[0][[3, 17]]
    out = cache.lookup([3, 17])
    with torch.no_grad():
        pre = teacher[0](x)
    torch.testing.assert_close(out["fitnet.hint"], pre.relu(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["at.map"], torch.nn.functional.normalize(pre, dim=1), rtol=1e-6, atol=1e-6)
    TeacherCache.open(tmp_path, expect_keys=["logits", "fitnet.hint", "at.map"], expect_top_k=4)
