"""Checkpoint files are trusted only as data: a crafted checkpoint runs no code, a corrupted or
incomplete one is a CheckpointError naming the file and what is wrong (and nothing trains), a state a
safe checkpoint cannot hold is refused before training, and so is a checkpoint_dir that cannot be
written."""
from __future__ import annotations

import os

import pytest
import torch

import distillx as dx
from distillx.engine import CheckpointError

from distillx.testing import data, loader, same, state, student, teacher


class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint.pt would do with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def saved(tmp_path):
    """A real checkpoint (after one student epoch) and the data to resume it with."""
    x, y, _, _ = data(64)
    d = dx.Distiller(teacher(), student(), [dx.method("kd")], checkpoint_dir=str(tmp_path / "run"), progress=False)
    d.fit(loader(x, y, 32, seed=0), 1)
    return str(tmp_path / "run" / "checkpoint.pt"), loader(x, y, 32, seed=0)


def resume(path, train, tmp_path):
    """Resume ``path`` in a fresh Distiller; the student must not move when the checkpoint is refused."""
    d = dx.Distiller(teacher(), student(), [dx.method("kd")], checkpoint_dir=str(tmp_path / "resumed"),
                     progress=False)
    before = state(d.student)
    try:
        d.fit(train, 2, resume=path)
    finally:
        assert same(state(d.student), before), "nothing trained"


def rewrite(path, change):
    # The test's own file: read fully (an older distillx's checkpoint held NumPy arrays too).
    content = torch.load(path, weights_only=False)
    change(content)
    torch.save(content, path)


def test_a_crafted_checkpoint_runs_no_code(saved, tmp_path):
    path, train = saved
    marker = tmp_path / "code-ran"
    rewrite(path, lambda c: c.update(metrics=RunsCode(marker)))
    with pytest.raises(CheckpointError, match=rf"checkpoint '{path}' holds objects other than tensors and plain "
                                              r"values, which a safe load refuses \(distillx never runs code"):
        resume(path, train, tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("where", [0.3, 0.5, 0.7])
def test_zeroed_bytes_are_found(saved, tmp_path, where):
    path, train = saved
    raw = bytearray(open(path, "rb").read())
    at = int(len(raw) * where)
    raw[at:at + 64] = bytes(64)
    open(path, "wb").write(raw)
    with pytest.raises(CheckpointError, match=rf"checkpoint '{path}' is corrupt"):
        resume(path, train, tmp_path)


def test_a_truncated_checkpoint(saved, tmp_path):
    path, train = saved
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match=rf"checkpoint '{path}' is corrupt or truncated"):
        resume(path, train, tmp_path)


@pytest.mark.parametrize("change, problem", [
    (lambda c: c.pop("phase"), "it is incomplete: missing phase"),
    (lambda c: [c.pop("history"), c.pop("optimizer")], "it is incomplete: missing optimizer, history"),
    (lambda c: c["position"].pop("step_rng"), "it is incomplete: missing position.step_rng"),
    (lambda c: c["position"].update(step="3"), "position.step is '3', not an int >= 0"),
    (lambda c: c["position"]["step_rng"].pop("torch"), "position.step_rng lacks torch"),
    (lambda c: c.update(phase="warmup"), "phase is 'warmup', not one of"),
    (lambda c: c.update(methods=[]), r"it saved 0 method state\(s\) for 1 method key\(s\)"),
    (lambda c: c.update(optimizer_class=3), "optimizer_class is 3, not a str"),
], ids=["phase", "two-keys", "step_rng", "step-type", "rng-torch", "phase-value", "methods", "optimizer-class"])
def test_an_incomplete_checkpoint_names_what_is_missing(saved, tmp_path, change, problem):
    path, train = saved
    rewrite(path, change)
    with pytest.raises(CheckpointError, match=rf"checkpoint '{path}' is not usable: {problem}"):
        resume(path, train, tmp_path)


def test_a_saved_state_that_does_not_load_is_a_checkpoint_error(saved, tmp_path):
    path, train = saved
    rewrite(path, lambda c: c["optimizer"].update(param_groups=[]))
    with pytest.raises(CheckpointError, match=rf"checkpoint '{path}': the saved optimizer state does not load"):
        resume(path, train, tmp_path)


def test_an_older_format_version_is_refused(saved, tmp_path):
    path, train = saved
    rewrite(path, lambda c: c.update(version=1))
    with pytest.raises(CheckpointError, match="has format version 1; this distillx reads version 2"):
        resume(path, train, tmp_path)


def test_checkpoints_hold_only_plain_values(saved):
    """Random states (NumPy's included) are tensors and plain values: a checkpoint loads with
    weights_only=True, and every member of the archive has its CRC-32."""
    import zipfile

    path, _ = saved
    content = torch.load(path, weights_only=True)
    assert isinstance(content["position"]["step_rng"]["numpy"]["keys"], torch.Tensor)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None and all(i.CRC != 0 for i in archive.infolist() if i.file_size)


class Warmup:
    """A callable LR lambda whose state (its __dict__, saved by LambdaLR) holds an object."""

    def __init__(self):
        self.clock = object()

    def __call__(self, step):
        return 1.0


def test_a_state_a_checkpoint_cannot_hold_is_refused_before_training(tmp_path):
    x, y, _, _ = data(64)
    d = dx.Distiller(teacher(), student(), [dx.method("kd")], checkpoint_dir=str(tmp_path), progress=False,
                     scheduler=lambda opt, total: torch.optim.lr_scheduler.LambdaLR(opt, Warmup()))
    before = state(d.student)
    with pytest.raises(TypeError, match=r"a checkpoint cannot hold checkpoint\['scheduler'\]\['lr_lambdas'\]\[0\]"
                                        r"\['clock'\]: it is a builtins.object"):
        d.fit(loader(x, y, 32, seed=0), 1)
    assert same(state(d.student), before) and not (tmp_path / "checkpoint.pt").exists()


def test_an_unwritable_checkpoint_dir_is_found_before_training(tmp_path):
    x, y, _, _ = data(64)
    (tmp_path / "a-file").write_text("not a directory")
    for bad in (tmp_path / "a-file", tmp_path / "a-file" / "sub"):
        t, s = teacher(), student()
        d = dx.Distiller(t, s, [dx.method("kd")], checkpoint_dir=str(bad), progress=False)
        before = state(t), state(s)
        with pytest.raises(OSError, match=rf"checkpoint_dir '{bad}' is not a writable directory"):
            d.fit(loader(x, y, 32, seed=0), 1, teacher_epochs=1)
        assert same(state(t), before[0]) and same(state(s), before[1]) and d.metrics.steps("teacher") == []
