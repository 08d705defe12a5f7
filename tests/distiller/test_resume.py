"""Checkpoints and exact resume: a run interrupted by SIGINT or killed (an exception) in any phase and
resumed in fresh objects ends with bit-identical weights to an uninterrupted run on CPU, whatever holds
the loader's generator; loaders whose random state cannot be saved are refused; bad checkpoints are
errors naming what does not match."""
from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler, TensorDataset

import distillx as dx
from distillx.config.data import digits
from distillx.data import tensor_loader
from distillx.engine import CheckpointError, TrainingInterrupted
from distillx._atomic import save_atomic
from distillx.engine import checkpoint as ckpt
from distillx.engine.loop import running_sums
from distillx.methods import Method

from distillx.testing import data, loader, same, state, student, teacher

EPOCHS, TEACHER_EPOCHS = 3, 2


class Crash(RuntimeError):
    """A run killed by a failure (no SIGINT handler, no checkpoint of the exact step)."""


class InterruptAt:
    """A task loss that sends SIGINT to this process (``how="sigint"``) or raises :class:`Crash`
    (``how="crash"``) on its ``at``-th call (cross-entropy otherwise).

    Calls count training steps and validation batches (validation uses the task loss too): with 320
    samples in batches of 32 and 450 validation samples in batches of 256, calls 1-24 are the teacher
    phase (10 steps + 2 validation batches per epoch), 25-60 distillation."""

    def __init__(self, at=None, how="sigint"):
        self.calls, self.at, self.how = 0, at, how

    def __call__(self, logits, targets):
        self.calls += 1
        if self.calls == self.at:
            if self.how == "crash":
                raise Crash(f"killed at call {self.at}")
            os.kill(os.getpid(), signal.SIGINT)
        return F.cross_entropy(logits, targets)


class LogitAdapter(Method):
    """MSE between a linear map of the student's logits and the teacher's; the map is built from the
    first features seen (the Distiller's dry forward pass before the student phase), with random
    weights from the global generator. ``signal_in_setup`` sends SIGINT during that pass."""

    name = "logit_adapter"
    options = {"signal_in_setup": False}

    def __init__(self, **options):
        super().__init__(**options)
        self.adapter = None

    @property
    def needs_setup(self):
        return self.adapter is None

    def setup(self, student, teacher):
        if self.signal_in_setup:
            os.kill(os.getpid(), signal.SIGINT)
        self.adapter = nn.Linear(student["logits"].shape[1], teacher["logits"].shape[1])

    def loss(self, student, teacher, batch=None):
        return F.mse_loss(self.adapter(student["logits"]), teacher["logits"])


class Transfer:
    """``select`` from the teacher; ``fail=True`` raises first (a run killed between the phases)."""

    def __init__(self, fail=False):
        self.fail = fail

    def __call__(self, t, s):
        if self.fail:
            raise Crash("killed during the transfer")
        return dx.transfer("select", t, s)


class ShuffledBatches(Sampler):
    """A batch sampler of its own: a nested RandomSampler (with its generator) orders the samples, a
    second generator decides whether the batches run backwards."""

    def __init__(self, n, batch_size, seed):
        self.order = RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))
        self.coin = torch.Generator().manual_seed(seed + 1)
        self.batch_size = batch_size

    def __iter__(self):
        idx = list(self.order)
        batches = [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        if torch.rand((), generator=self.coin) < 0.5:
            batches.reverse()
        return iter(batches)

    def __len__(self):
        return -(-len(self.order) // self.batch_size)


def make_loader(kind, x, y):
    if kind == "batch-sampler-as-sampler":  # distillx.data.tensor_loader, the digits config's loader
        return tensor_loader(x, y, 32, shuffle=True, seed=5)
    if kind == "custom-batch-sampler":
        return DataLoader(TensorDataset(x, y), batch_sampler=ShuffledBatches(len(x), 32, seed=5))
    return loader(x, y, 32, seed=None if kind == "global-rng-shuffle" else 5)


def run(tmp, kind, interrupt_at=None, how="sigint", resume=None, seeds=(0, 1), transfer_fails=False,
        signal_in_setup=False, cache=False, balance=None):
    x, y, xv, yv = data(320)
    t, s = teacher(seeds[0]), student(seeds[1])
    train = make_loader(kind, x, y)
    d = dx.Distiller(t, s, [dx.method("kd", T=2.0, weight=0.5), LogitAdapter(weight=0.1, signal_in_setup=signal_in_setup)],
                     task_loss=InterruptAt(interrupt_at, how), checkpoint_dir=str(tmp),
                     augmentations=[] if cache else [{"name": "noise", "std": 0.05}], cache_teacher=cache,
                     seed=3, transfer=Transfer(transfer_fails),
                     weight_schedules={"kd": dx.engine.linear(0.0, 1.0, 2)}, progress=False, balance=balance,
                     balance_every=7 if balance else None)
    if resume:
        torch.manual_seed(1234)  # a different process state: everything must come from the checkpoint
        random.seed(1234)
        np.random.seed(1234)
    d.fit(train, EPOCHS, loader(xv, yv, 256, shuffle=False), teacher_epochs=TEACHER_EPOCHS, resume=resume)
    return d, state(s), state(t)


_REFERENCES = {}


def reference(kind, tmp_path_factory, cache=False, balance=None):
    """The uninterrupted run of a loader kind (computed once per kind, with and without the teacher cache
    or loss balancing)."""
    if (kind, cache, balance) not in _REFERENCES:
        torch.manual_seed(0)
        _REFERENCES[kind, cache, balance] = run(tmp_path_factory.mktemp(f"ref-{kind}"), kind, cache=cache,
                                                balance=balance)
    return _REFERENCES[kind, cache, balance]


def check_resume_is_bitwise(tmp_path, tmp_path_factory, kind, at=None, how="sigint", expect=None, cache=False,
                            balance=None, **cut):
    ref, ref_student, ref_teacher = reference(kind, tmp_path_factory, cache, balance)
    torch.manual_seed(0)
    with pytest.raises(TrainingInterrupted if how == "sigint" else Crash) as info:
        run(tmp_path, kind, interrupt_at=at, how=how, cache=cache, balance=balance, **cut)
    path = str(tmp_path / "checkpoint.pt")
    if how == "sigint":
        assert info.value.path == path
    saved = ckpt.load(path)
    assert (saved["phase"], saved["position"]["epoch"], saved["position"]["step"] > 0) == expect
    # fresh models with other initial weights: the checkpoint restores everything
    resumed, res_student, res_teacher = run(tmp_path, kind, resume=True, seeds=(7, 8), cache=cache, balance=balance)
    assert same(res_teacher, ref_teacher)
    assert same(res_student, ref_student)
    assert resumed.history == ref.history and resumed.teacher_history == ref.teacher_history
    assert resumed.metrics.epochs() == ref.metrics.epochs()


# (how, where) -> the checkpoint the resumed run starts from: (phase, epoch, mid-epoch?)
KILLS = {
    "sigint-teacher-epoch": (dict(how="sigint", at=15), ("teacher", 1, True)),
    "crash-teacher-epoch": (dict(how="crash", at=15), ("teacher", 1, False)),
    "sigint-boundary-setup-forward": (dict(how="sigint", signal_in_setup=True), ("student", 0, False)),
    "crash-boundary-transfer": (dict(how="crash", transfer_fails=True), ("teacher", TEACHER_EPOCHS, False)),
    "sigint-first-student-epoch": (dict(how="sigint", at=30), ("student", 0, True)),
    "crash-first-student-epoch": (dict(how="crash", at=30), ("teacher", TEACHER_EPOCHS, False)),
    "sigint-mid-student": (dict(how="sigint", at=52), ("student", 2, True)),
    "crash-mid-student": (dict(how="crash", at=52), ("student", 2, False)),
}


@pytest.mark.parametrize("kill", list(KILLS))
def test_a_kill_in_any_phase_resumes_bitwise(tmp_path, tmp_path_factory, kill):
    """SIGINT (a checkpoint of the exact step) or a crash (the last epoch's checkpoint) in the teacher
    phase, between the phases (transfer, the dry forward pass that builds adapters), in the first
    student epoch and later: the resumed run ends exactly where the uninterrupted one does."""
    options, expect = KILLS[kill]
    check_resume_is_bitwise(tmp_path, tmp_path_factory, "batch-sampler-as-sampler", expect=expect, **options)


@pytest.mark.parametrize("kill", ["sigint-boundary-setup-forward", "sigint-first-student-epoch", "crash-mid-student"])
def test_a_kill_with_the_teacher_cache_resumes_bitwise(tmp_path, tmp_path_factory, kill):
    """With ``cache_teacher=True`` the resumed run's cache holds the *trained* teacher's outputs (the
    teacher is restored from the checkpoint before the cache is opened or built), so a kill in the
    student phase or its setup ends where the uninterrupted cached run does."""
    options, expect = KILLS[kill]
    check_resume_is_bitwise(tmp_path, tmp_path_factory, "batch-sampler-as-sampler", expect=expect, cache=True,
                            **options)


@pytest.mark.parametrize("kill", ["sigint-teacher-epoch", "sigint-first-student-epoch", "sigint-mid-student",
                                  "crash-mid-student"])
def test_a_kill_with_balanced_loss_terms_resumes_bitwise(tmp_path, tmp_path_factory, kill):
    """``balance="auto"`` (measuring every 7 steps: no student kill lands on a multiple): the checkpoint
    holds the factors and the step count, so the resumed run measures on the same steps, with the same
    factors, bit for bit."""
    options, expect = KILLS[kill]
    check_resume_is_bitwise(tmp_path, tmp_path_factory, "batch-sampler-as-sampler", expect=expect, balance="auto",
                            **options)
    ref = reference("batch-sampler-as-sampler", tmp_path_factory, balance="auto")[0]
    factors = [r["weight/logit_adapter"] for r in ref.metrics.steps("student")]
    assert len(set(factors)) > 2  # the factors did move: the resumed run had to restore them


@pytest.mark.parametrize("kind", ["loader-generator", "global-rng-shuffle", "custom-batch-sampler"])
@pytest.mark.parametrize("how", ["sigint", "crash"])
def test_every_loader_kind_resumes_bitwise(tmp_path, tmp_path_factory, kind, how):
    expect = ("student", 0, True) if how == "sigint" else ("teacher", TEACHER_EPOCHS, False)
    check_resume_is_bitwise(tmp_path, tmp_path_factory, kind, at=30, how=how, expect=expect)


def test_generators_are_found_wherever_the_loader_keeps_them():
    train = digits()["train"]  # a BatchSampler passed as sampler=, over a RandomSampler with a generator
    assert ckpt.loader_generators(train) == [train.sampler.sampler.generator]
    custom = make_loader("custom-batch-sampler", *data(64)[:2])
    assert ckpt.loader_generators(custom) == [custom.batch_sampler.coin, custom.batch_sampler.order.generator]
    plain = make_loader("loader-generator", *data(64)[:2])
    assert ckpt.loader_generators(plain) == [plain.generator]

    class Wrapper:  # an iterable around a loader (e.g. one that counts or filters batches)
        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            return iter(self.inner)

    assert ckpt.loader_generators(Wrapper(train), train) == [train.sampler.sampler.generator]
    assert ckpt.loader_generators([(torch.zeros(2, 64), torch.zeros(2, dtype=torch.long))]) == []


class ForeignShuffle(Sampler):
    def __init__(self, n, rng):
        self.n, self.rng = n, rng

    def __iter__(self):
        idx = list(range(self.n))
        self.rng.shuffle(idx)
        return iter(idx)

    def __len__(self):
        return self.n


@pytest.mark.parametrize("rng, kind", [(random.Random(0), "random.Random"),
                                       (np.random.RandomState(0), "numpy.random.mtrand.RandomState"),
                                       (np.random.default_rng(0), "numpy.random._generator.Generator")],
                         ids=["random.Random", "RandomState", "numpy-Generator"])
def test_a_sampler_whose_random_state_cannot_be_saved_is_refused(tmp_path, rng, kind):
    x, y, xv, yv = data(64)
    train = DataLoader(TensorDataset(x, y), batch_size=32, sampler=ForeignShuffle(len(x), rng))
    d = dx.Distiller(teacher(), student(), [dx.method("kd")], checkpoint_dir=str(tmp_path), progress=False)
    before = state(d.student)
    with pytest.raises(ValueError, match=rf"train_loader draws from random state distillx cannot save in a checkpoint: "
                                         rf"train_loader\.sampler\.rng \({kind}\).*torch\.Generator"):
        d.fit(train, 1)
    assert same(state(d.student), before) and not (tmp_path / "checkpoint.pt").exists(), "refused before training"
    val = DataLoader(TensorDataset(xv, yv), batch_size=256, sampler=ForeignShuffle(len(xv), rng))
    with pytest.raises(ValueError, match=r"val_loader draws from random state .*val_loader\.sampler\.rng"):
        d.fit(loader(x, y, 32, seed=0), 1, val_loader=val)
    # Without checkpoints nothing is ever resumed: the loader is accepted.
    plain = dx.Distiller(teacher(), student(), [dx.method("kd")], progress=False)
    assert len(plain.fit(train, 1)) == 1


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
    with pytest.raises(CheckpointError, match="is corrupt or truncated: not a readable zip archive"):
        d.fit(loader(x, y, 32, seed=0), 2, resume=path)
    with pytest.raises(CheckpointError, match="does not exist"):
        d.fit(loader(x, y, 32, seed=0), 2, resume=str(tmp_path / "nope.pt"))
    torch.save({"something": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a distillx checkpoint"):
        d.fit(loader(x, y, 32, seed=0), 2, resume=str(tmp_path / "foreign.pt"))
    with pytest.raises(ValueError, match="checkpoint_dir"):
        d.fit(loader(x, y, 32, seed=0), 2, resume=True)


# -- a checkpoint resumed by a run that differs from the saved one --------------------------------
class Unsized:
    """An iterable over a loader without ``__len__`` (its steps per epoch are known only by iterating)."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return iter(self.inner)


def _mid_epoch_checkpoint(tmp_path, at=7):
    """A checkpoint written by SIGINT at step ``at`` of the first epoch (10 steps of 32 samples)."""
    x, y, _, _ = data(320)
    d = dx.Distiller(teacher(), student(), [dx.method("kd")], task_loss=InterruptAt(at), checkpoint_dir=str(tmp_path),
                     progress=False)
    with pytest.raises(TrainingInterrupted):
        d.fit(loader(x, y, 32, seed=0), 2)
    path = str(tmp_path / "checkpoint.pt")
    assert (ckpt.load(path)["position"]["epoch"], ckpt.load(path)["position"]["step"]) == (0, at)
    return path, x, y


@pytest.mark.parametrize("sized", [True, False], ids=["len", "no-len"])
def test_a_train_loader_shorter_than_the_saved_position_is_named(tmp_path, sized):
    path, x, y = _mid_epoch_checkpoint(tmp_path)
    train = loader(x, y, 64, seed=0)  # 5 steps per epoch
    d = dx.Distiller(teacher(), student(), [dx.method("kd")], progress=False)
    expect = (rf"checkpoint '{path}' was saved at step 7 of epoch 0, but this run's train_loader "
              + (r"has 5 steps per epoch" if sized else r"yields only 5 batches") + r".*different batch size or dataset")
    with pytest.raises(CheckpointError, match=expect):
        d.fit(train if sized else Unsized(train), 2, resume=path)
    assert [r["step"] for r in d.metrics.steps()] == list(range(1, 8)), "the checkpoint's steps, no new one"


def test_an_optimizer_of_another_class_is_named(tmp_path):
    """AdamW's state loads into SGD without complaint and the first SGD step fails on KeyError:
    'momentum'; the checkpoint saves its optimizer's class and the resume names both."""
    path, x, y = _mid_epoch_checkpoint(tmp_path)
    d = dx.Distiller(teacher(), student(), [dx.method("kd")], progress=False,
                     optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    with pytest.raises(CheckpointError, match=rf"checkpoint '{path}' was saved with optimizer "
                                              r"torch\.optim\.adamw\.AdamW, this run uses torch\.optim\.sgd\.SGD"):
        d.fit(loader(x, y, 32, seed=0), 2, resume=path)
    assert d.metrics.steps() == [] and ckpt.load(path)["optimizer_class"] == "torch.optim.adamw.AdamW"


def test_an_optimizer_of_another_class_without_a_saved_class_is_named(tmp_path):
    """A checkpoint written before the class was saved: the hyperparameters the run's optimizer
    needs and the saved state lacks are named instead."""
    path, x, y = _mid_epoch_checkpoint(tmp_path)
    content = torch.load(path, weights_only=True)
    content.pop("optimizer_class", None)
    ckpt.save(content, path)
    d = dx.Distiller(teacher(), student(), [dx.method("kd")], progress=False,
                     optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    with pytest.raises(CheckpointError, match=rf"checkpoint '{path}': the saved optimizer state lacks 'dampening', "
                                              r"'momentum', which this run's SGD needs: it was written by another"):
        d.fit(loader(x, y, 32, seed=0), 2, resume=path)


def _as_saved_by_two_processes(path):
    """Rewrite a one-process checkpoint as two processes write theirs: every random state per rank
    (``{"ranks": [...]}``, both the saved one here), and the interrupted epoch's running sums split
    between the ranks (halves: exact in floating point)."""
    content = torch.load(path, weights_only=True)
    pos = content["position"]
    for key in ("epoch_rng", "step_rng"):
        if pos[key] is not None:
            pos[key] = {"ranks": [pos[key], pos[key]]}
    half = {"sums": {k: v / 2 for k, v in pos["sums"].items()}, "n": pos["n"] // 2}
    pos["ranks"] = [half, {"sums": half["sums"], "n": pos["n"] - half["n"]}]
    ckpt.save(content, path)


def test_a_checkpoint_of_another_world_size_warns_and_keeps_what_is_exact(tmp_path):
    """A checkpoint of 2 processes resumed by 1: a warning naming both world sizes and what is not
    exact; the interrupted epoch's running sums of every saved process carry over, so with the same
    global batch and random state the run ends as the uninterrupted one."""
    x, y, _, _ = data(320)
    ref = dx.Distiller(teacher(), student(), [dx.method("kd")], task_loss=InterruptAt(), progress=False)
    ref_history = ref.fit(loader(x, y, 32, seed=0), 2)
    path, _, _ = _mid_epoch_checkpoint(tmp_path)
    _as_saved_by_two_processes(path)
    d = dx.Distiller(teacher(), student(seed=9), [dx.method("kd")], task_loss=InterruptAt(), progress=False)
    with pytest.warns(UserWarning, match=rf"checkpoint '{path}' was saved by 2 processes; this run has 1\. Exact: "
                                         r"the weights.*Not exact: each process's random state"):
        history = d.fit(loader(x, y, 32, seed=0), 2, resume=path)
    assert history == ref_history and same(state(d.student), state(ref.student))


@pytest.mark.parametrize("saved, now", [(1, 2), (2, 1), (2, 3), (3, 2), (4, 4)])
def test_running_sums_of_another_world_size_are_counted_once(saved, now):
    """Over the resuming processes the interrupted epoch's sums add up to the saved processes' total,
    whatever either world size (the epoch's metrics are summed over processes)."""
    per_rank = [{"sums": {"loss": float(r + 1)}, "n": 10 * (r + 1)} for r in range(saved)]
    position = {"sums": per_rank[0]["sums"], "n": per_rank[0]["n"]}
    if saved > 1:
        position["ranks"] = per_rank
    got = [running_sums(position, rank, now) for rank in range(now)]
    assert sum(g["sums"]["loss"] for g in got) == sum(r + 1 for r in range(saved))
    assert sum(g["n"] for g in got) == sum(10 * (r + 1) for r in range(saved))
    if saved == now:
        assert got == per_rank
