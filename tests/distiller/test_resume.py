"""Checkpoints and exact resume: a run interrupted by SIGINT (mid teacher phase or mid distillation)
and resumed in fresh objects ends with bit-identical weights to an uninterrupted run on CPU; bad
checkpoints are errors naming what does not match."""
from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.nn.functional as F

import distillx as dx
from distillx.engine import CheckpointError, TrainingInterrupted
from distillx._atomic import save_atomic
from distillx.engine import checkpoint as ckpt

from distillx.testing import data, loader, same, state, student, teacher

EPOCHS, TEACHER_EPOCHS = 3, 2


class InterruptAt:
    """A task loss that sends SIGINT to this process on its ``at``-th call (cross-entropy otherwise).

    Calls count training steps and validation batches (validation uses the task loss too): with 320
    samples in batches of 32 and 450 validation samples in batches of 256, calls 1-24 are the teacher
    phase (10 steps + 2 validation batches per epoch), 25-60 distillation."""

    def __init__(self, at=None):
        self.calls, self.at = 0, at

    def __call__(self, logits, targets):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return F.cross_entropy(logits, targets)


def run(tmp, global_shuffle, interrupt_at=None, resume=None, seeds=(0, 1)):
    x, y, xv, yv = data(320)
    t, s = teacher(seeds[0]), student(seeds[1])
    train = loader(x, y, 32, seed=None if global_shuffle else 5)
    d = dx.Distiller(t, s, [dx.method("kd", T=2.0, weight=0.5)], task_loss=InterruptAt(interrupt_at),
                     checkpoint_dir=str(tmp), augmentations=[{"name": "noise", "std": 0.05}], seed=3,
                     transfer="select", weight_schedules={"kd": dx.engine.linear(0.0, 1.0, 2)}, progress=False)
    if resume:
        torch.manual_seed(1234)  # a different process state: everything must come from the checkpoint
    d.fit(train, EPOCHS, loader(xv, yv, 256, shuffle=False), teacher_epochs=TEACHER_EPOCHS, resume=resume)
    return d, state(s), state(t)


@pytest.mark.parametrize("global_shuffle", [False, True], ids=["loader-generator", "global-rng-shuffle"])
@pytest.mark.parametrize("at", [15, 30, 52], ids=["teacher-phase", "student-epoch0", "student-epoch2"])
def test_interrupt_and_resume_is_bitwise(tmp_path, global_shuffle, at):
    torch.manual_seed(0)
    ref, ref_student, ref_teacher = run(tmp_path / "ref", global_shuffle)
    torch.manual_seed(0)
    with pytest.raises(TrainingInterrupted) as info:
        run(tmp_path / "cut", global_shuffle, interrupt_at=at)
    assert info.value.path == str(tmp_path / "cut" / "checkpoint.pt") and os.path.isfile(info.value.path)
    saved = ckpt.load(info.value.path)
    assert saved["position"]["step"] > 0, "interrupted mid-epoch"
    # fresh models with other initial weights: the checkpoint restores everything
    resumed, res_student, res_teacher = run(tmp_path / "cut", global_shuffle, resume=True, seeds=(7, 8))
    assert same(res_teacher, ref_teacher)
    assert same(res_student, ref_student)
    assert resumed.history == ref.history and resumed.teacher_history == ref.teacher_history
    assert resumed.metrics.epochs() == ref.metrics.epochs()


def test_checkpoint_every_epoch_is_atomic(tmp_path):
    x, y, _, _ = data(128)
    d = dx.Distiller(teacher(), student(), [dx.method("kd")], checkpoint_dir=str(tmp_path), progress=False)
    d.fit(loader(x, y, 32, seed=0), 2)
    assert os.listdir(tmp_path) == ["checkpoint.pt"], "no temporary files left"
    saved = ckpt.load(str(tmp_path / "checkpoint.pt"))
    assert saved["phase"] == "student" and saved["position"]["epoch"] == 2 and saved["position"]["step"] == 0
    assert same(saved["student"], d.student.state_dict())


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    save_atomic({"a": 1}, path)

    def broken(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"a": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"a": 1} and os.listdir(tmp_path) == ["checkpoint.pt"]


def _checkpoint(tmp_path):
    x, y, _, _ = data(64)
    d = dx.Distiller(teacher(), student(), [dx.method("kd")], checkpoint_dir=str(tmp_path), progress=False)
    d.fit(loader(x, y, 32, seed=0), 1)
    return str(tmp_path / "checkpoint.pt"), x, y


def test_mismatched_checkpoints_name_what_differs(tmp_path):
    path, x, y = _checkpoint(tmp_path)
    wider = dx.Distiller(teacher(), student(hidden=32), [dx.method("kd")], progress=False)
    with pytest.raises(CheckpointError, match=r"0\.weight.*\(24, 64\).*\(32, 64\)"):
        wider.fit(loader(x, y, 32, seed=0), 2, resume=path)
    other = dx.Distiller(teacher(), student(), [dx.method("kd"), dx.method("kd")], progress=False)
    with pytest.raises(CheckpointError, match=r"methods \['kd'\].*\['kd', 'kd#2'\]"):
        other.fit(loader(x, y, 32, seed=0), 2, resume=path)


def test_corrupt_or_missing_checkpoints(tmp_path):
    path, x, y = _checkpoint(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(100)
    d = dx.Distiller(teacher(), student(), [dx.method("kd")], progress=False)
    with pytest.raises(CheckpointError, match="cannot be read"):
        d.fit(loader(x, y, 32, seed=0), 2, resume=path)
    with pytest.raises(CheckpointError, match="does not exist"):
        d.fit(loader(x, y, 32, seed=0), 2, resume=str(tmp_path / "nope.pt"))
    torch.save({"something": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a distillx checkpoint"):
        d.fit(loader(x, y, 32, seed=0), 2, resume=str(tmp_path / "foreign.pt"))
    with pytest.raises(ValueError, match="checkpoint_dir"):
        d.fit(loader(x, y, 32, seed=0), 2, resume=True)
