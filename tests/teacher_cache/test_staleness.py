"""A cache is reused only for what it was built from: the teacher's weights *and* code (module
structure, classes), the dataset's inputs (hashed as they are cached), and the caller's capture
description; anything else rebuilds it. Rebuilding deletes only the cache's own files."""
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distillx.teacher_cache import MANIFEST, CacheMismatchError, TeacherCache, inputs_fingerprint, teacher_fingerprint

from .test_teacher_cache import N, make_data, make_teacher, reference


def _build(teacher, data, tmp_path, **kw):
    return TeacherCache.build_or_open(teacher, DataLoader(data, batch_size=16), tmp_path, dtype=torch.float32, **kw)


def test_other_inputs_of_the_same_size_rebuild(tmp_path):
    teacher = make_teacher()
    assert _build(teacher, make_data(seed=0), tmp_path).was_built
    assert not _build(teacher, make_data(seed=0), tmp_path).was_built  # the same inputs: reused
    other = make_data(seed=1)  # a different split of the same size
    cache = _build(teacher, other, tmp_path)
    assert cache.was_built
    assert torch.equal(cache.lookup(torch.arange(N))["logits"], reference(teacher, other.tensors[0], 16))
    # only the targets differ: the teacher's outputs depend on the inputs alone, so the cache holds
    relabelled = TensorDataset(other.tensors[0], (other.tensors[1] + 1) % 10)
    assert not _build(teacher, relabelled, tmp_path).was_built


def test_a_caller_fingerprint_does_not_switch_off_the_input_check(tmp_path):
    teacher = make_teacher()
    assert _build(teacher, make_data(seed=0), tmp_path, fingerprint="cifar-v1").was_built
    assert _build(teacher, make_data(seed=1), tmp_path, fingerprint="cifar-v1").was_built
    # verify_inputs=False trusts the fingerprint alone (no pass over the data before opening)
    assert not _build(teacher, make_data(seed=2), tmp_path, fingerprint="cifar-v1", verify_inputs=False).was_built


def test_the_teacher_code_is_part_of_the_fingerprint(tmp_path):
    relu = make_teacher()
    tanh = make_teacher()
    tanh[1] = nn.Tanh()  # the same weights, another activation
    assert relu.state_dict().keys() == tanh.state_dict().keys()
    assert teacher_fingerprint(relu, N) != teacher_fingerprint(tanh, N)
    assert _build(relu, make_data(), tmp_path).was_built
    cache = _build(tanh, make_data(), tmp_path)
    assert cache.was_built
    assert torch.equal(cache.lookup(torch.arange(N))["logits"], reference(tanh, make_data().tensors[0], 16))

    class Doubled(nn.Sequential):  # another class with the same modules and weights
        def forward(self, x):
            return 2 * super().forward(x)

    doubled = Doubled(*make_teacher())
    assert teacher_fingerprint(doubled, N) != teacher_fingerprint(relu, N)
    assert teacher_fingerprint(make_teacher(), N) == teacher_fingerprint(relu, N)  # deterministic


def test_inputs_fingerprint_of_mapping_batches_and_errors():
    ids = torch.arange(24).reshape(6, 4)
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(4, dtype=torch.long), "labels": i} for i in range(6)]
    a = inputs_fingerprint(DataLoader(rows, batch_size=4))
    rows[5]["labels"] = 0  # labels are not inputs
    assert inputs_fingerprint(DataLoader(rows, batch_size=4)) == a
    rows[5]["attention_mask"] = torch.tensor([1, 1, 1, 0])
    assert inputs_fingerprint(DataLoader(rows, batch_size=4)) != a
    with pytest.raises(ValueError, match="map-style"):
        inputs_fingerprint([torch.zeros(2, 3)])


def test_a_mismatch_names_the_inputs(tmp_path):
    teacher = make_teacher()
    _build(teacher, make_data(seed=0), tmp_path)
    other = inputs_fingerprint(DataLoader(make_data(seed=1), batch_size=16))
    with pytest.raises(CacheMismatchError, match="inputs: the dataset's inputs differ from those the cache was built"):
        TeacherCache.open(tmp_path, expect_inputs=other)


def test_a_rebuild_deletes_only_the_cache_s_own_files(tmp_path):
    teacher = make_teacher()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "weights.bin").write_text("mine too")
    # a manifest that is not a teacher cache's: the build stops, nothing is deleted or replaced
    foreign = json.dumps({"format": "someone-else", "tensors": {"a": {"file": "notes.txt"}}})
    (tmp_path / MANIFEST).write_text(foreign)
    with pytest.raises(ValueError, match="'someone-else' manifest, not a teacher cache's"):
        _build(teacher, make_data(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / MANIFEST).read_text() == foreign
    (tmp_path / MANIFEST).unlink()
    _build(teacher, make_data(), tmp_path)
    # a cache manifest edited to list the user's files: only names of the cache's own scheme go
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["tensors"]["x"] = {"file": "weights.bin"}
    manifest["tensors"]["y"] = {"file": "notes.txt"}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    _build(make_teacher(seed=3), make_data(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "weights.bin").read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000-logits.bin", MANIFEST, "notes.txt", "weights.bin"]
