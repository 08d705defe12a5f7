"""The production Distiller: teacher phase then transfer then distillation, per-phase optimizers and
LR schedules, loss-weight schedules, augmentations, AMP, progress, metrics files, NaN handling."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import distillx as dx
from distillx.distiller import NonFiniteLossError
from distillx.engine import checkpoint as ckpt
from distillx.engine.schedules import lr_factor
from distillx.methods import Method
from distillx.engine.training import evaluate
from distillx.plugin import get_plugin_manager, hookimpl

from distillx.testing import data, loader, same, state, student, teacher


def test_teacher_phase_then_transfer_then_distillation(tmp_path):
    x, y, xv, yv = data(512)
    t, s = teacher(), student()
    untrained_acc = evaluate(t, loader(xv, yv, 512, shuffle=False))["accuracy"]
    seen = {}

    def transfer(tt, ss):
        seen["teacher"] = state(tt)   # the transfer sees the trained teacher
        return dx.transfer("direct", tt, ss)

    d = dx.Distiller(t, s, [dx.method("kd")], transfer=transfer, progress=False,
                     teacher_optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    history = d.fit(loader(x, y, 64, seed=0), 2, loader(xv, yv, 512, shuffle=False), teacher_epochs=4)
    assert len(d.teacher_history) == 4 and len(history) == 2
    assert d.teacher_history[-1]["val_accuracy"] > untrained_acc + 0.3
    assert same(seen["teacher"], {k: v for k, v in state(t).items()}), "the teacher does not move after its phase"
    assert [e["phase"] for e in d.metrics.to_dict()["epochs"]] == ["teacher"] * 4 + ["student"] * 2


def test_teacher_without_trainable_parameters_is_refused():
    x, y, _, _ = data(64)
    t = teacher()
    for p in t.parameters():
        p.requires_grad_(False)
    d = dx.Distiller(t, student(), [dx.method("kd")], progress=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        d.fit(loader(x, y, 32, seed=0), 1, teacher_epochs=1)


def test_lr_schedules_per_phase():
    assert [round(lr_factor("cosine", s, 10, 2), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_factor("linear", 6, 10, 2) == pytest.approx(0.5)
    assert lr_factor("constant", 9, 10, 2) == 1.0
    x, y, _, _ = data(128)
    lrs = {"teacher": [], "student": []}

    def recorder(phase):
        def factory(optimizer, total):
            sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
            step = sched.step
            sched.step = lambda *a: (lrs[phase].append(optimizer.param_groups[0]["lr"]), step(*a))[1]
            return sched
        return factory

    d = dx.Distiller(teacher(), student(), [dx.method("kd")], progress=False, scheduler=recorder("student"),
                     teacher_scheduler=recorder("teacher"),
                     optimizer=lambda p: torch.optim.SGD(p, lr=0.1), teacher_optimizer=lambda p: torch.optim.SGD(p, lr=0.2))
    d.fit(loader(x, y, 32, seed=0), 1, teacher_epochs=1)
    assert lrs["teacher"] == pytest.approx([0.2 / (1 + i) for i in range(4)])
    assert lrs["student"] == pytest.approx([0.1 / (1 + i) for i in range(4)])
    with pytest.raises(ValueError, match="scheduler must be one of"):
        dx.Distiller(teacher(), student(), [dx.method("kd")], scheduler="exponential").fit(loader(x, y, 32), 1)


def test_weight_schedule_ramps_a_term():
    x, y, _, _ = data(128)
    d = dx.Distiller(teacher(), student(), [dx.method("kd")], progress=False, task_weight=1.0,
                     weight_schedules={"kd": dx.engine.linear(0.0, 2.0, epochs=1)})
    d.fit(loader(x, y, 32, seed=0), 2)
    steps = d.metrics.steps("student")
    assert steps[0]["kd"] == 0.0                                  # weight 0 at the start
    for record in steps:
        assert record["loss"] == pytest.approx(record["task"] + record["kd"], rel=1e-6)
    assert steps[1]["kd"] > 0 and steps[-1]["kd"] > 0
    with pytest.raises(ValueError, match="not a loss term"):
        dx.Distiller(teacher(), student(), [dx.method("kd")], weight_schedules={"at": dx.engine.linear(0, 1, 1)})


class Recorder(Method):
    """Records the inputs both models saw (logit MSE loss)."""
    name = "recorder"

    def __init__(self, **options):
        super().__init__(**options)
        self.inputs = []

    def loss(self, student, teacher, batch=None):
        self.inputs.append(batch[0].detach().clone())
        return F.mse_loss(student["logits"], teacher["logits"])


def test_augmentations_reach_both_models_and_are_seeded():
    x, y, _, _ = data(64)

    def run(seed):
        rec = Recorder()
        d = dx.Distiller(teacher(), student(), [rec], progress=False, seed=seed,
                         augmentations=["flip", {"name": "noise", "std": 0.5}])
        d.fit(loader(x, y, 64, shuffle=False), 1)
        return rec.inputs[0]

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a.sort(1).values, x.sort(1).values, atol=0.05), "noise was added"
    with pytest.raises(TypeError, match="augmentations\\[0\\]"):
        dx.Distiller(teacher(), student(), [dx.method("kd")], augmentations=[42])
    with pytest.raises(ValueError, match="unknown|not registered|no_such"):
        dx.Distiller(teacher(), student(), [dx.method("kd")], augmentations=["no_such"])


def test_mixup_soft_targets_train():
    x, y, _, _ = data(128)
    d = dx.Distiller(teacher(), student(), [dx.method("kd")], progress=False,
                     augmentations=[{"name": "mixup", "alpha": 0.4, "num_classes": 10}])
    history = d.fit(loader(x, y, 32, seed=0), 2)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def test_bf16_autocast_on_cpu_and_fp16_needs_cuda():
    x, y, _, _ = data(128)
    calls = []

    class Spy(Method):
        name = "spy"

        def loss(self, student, teacher, batch=None):
            calls.append((torch.is_autocast_enabled("cpu"), student["logits"].dtype))
            return dx.kd_loss(student["logits"], teacher["logits"])

    d = dx.Distiller(teacher(), student(), [Spy()], amp="bf16", progress=False)
    history = d.fit(loader(x, y, 32, seed=0), 1)
    assert calls and calls[0] == (True, torch.bfloat16)
    assert torch.isfinite(torch.tensor(history[0]["loss"]))
    assert all(p.dtype == torch.float32 for p in d.student.parameters()), "master weights stay float32"
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        dx.Distiller(teacher(), student(), [dx.method("kd")], amp="fp16")
    with pytest.raises(ValueError, match="amp must be"):
        dx.Distiller(teacher(), student(), [dx.method("kd")], amp="fp8")


class NaNAt(Method):
    """Logit MSE that turns NaN on its ``at``-th call."""
    name = "nan_at"
    options = {"at": 1}

    def __init__(self, **options):
        super().__init__(**options)
        self.calls = 0

    def loss(self, student, teacher, batch=None):
        self.calls += 1
        value = F.mse_loss(student["logits"], teacher["logits"])
        return value * float("nan") if self.calls == self.at else value


def test_nan_loss_stops_with_position_and_keeps_the_checkpoint(tmp_path):
    x, y, _, _ = data(128)    # 4 steps per epoch
    d = dx.Distiller(teacher(), student(), [NaNAt(at=7)], checkpoint_dir=str(tmp_path), progress=False)
    with pytest.raises(NonFiniteLossError) as info:
        d.fit(loader(x, y, 32, seed=0), 3)
    message = str(info.value)
    assert "phase 'student', epoch 1, step 3" in message and "nan_at" in message
    assert str(tmp_path / "checkpoint.pt") in message
    saved = ckpt.load(str(tmp_path / "checkpoint.pt"))
    assert saved["position"] == {**saved["position"], "epoch": 1, "step": 0}, "the last good (epoch-0) checkpoint"


class FailsAtEpochEnd:
    """A plugin whose distillx_on_epoch_end hook raises at the end of epoch ``at`` (0-based)."""

    def __init__(self, at):
        self.at = at

    @hookimpl
    def distillx_on_epoch_end(self, distiller, epoch, metrics):
        if epoch == self.at:
            raise RuntimeError(f"the hook failed at the end of epoch {epoch}")


def test_an_epoch_end_hook_that_raises_loses_no_epoch(tmp_path):
    """The epoch's checkpoint is written before distillx_on_epoch_end runs: a hook that raises stops
    the run with that epoch saved, and a resume continues from its end to the uninterrupted run's weights."""
    x, y, _, _ = data(128)

    def run(directory, seed=1, resume=None):
        d = dx.Distiller(teacher(), student(seed), [dx.method("kd")], checkpoint_dir=str(directory), progress=False)
        return d, d.fit(loader(x, y, 32, seed=0), 3, resume=resume)

    ref, ref_history = run(tmp_path / "ref")
    get_plugin_manager().register(FailsAtEpochEnd(at=1), name="fails")
    with pytest.raises(RuntimeError, match="the hook failed at the end of epoch 1"):
        run(tmp_path / "cut")
    saved = ckpt.load(str(tmp_path / "cut" / "checkpoint.pt"))
    assert (saved["position"]["epoch"], saved["position"]["step"]) == (2, 0), "epochs 0 and 1 complete"
    assert saved["history"]["student"] == ref_history[:2]
    get_plugin_manager().unregister(name="fails")
    resumed, history = run(tmp_path / "cut", seed=7, resume=True)
    assert history == ref_history and same(state(resumed.student), state(ref.student))


def test_empty_loader_is_an_error():
    d = dx.Distiller(teacher(), student(), [dx.method("kd")], progress=False)
    with pytest.raises(ValueError, match="empty"):
        d.fit([], 1)
    with pytest.raises(ValueError, match="teacher_epochs"):
        d.fit(loader(*data(64)[:2], 32), 1, teacher_epochs=-1)


def test_progress_bar_only_on_a_terminal(capsys, monkeypatch):
    x, y, _, _ = data(64)
    dx.Distiller(teacher(), student(), [dx.method("kd")]).fit(loader(x, y, 32, seed=0), 1)
    assert capsys.readouterr().err == "", "not a TTY: quiet"
    dx.Distiller(teacher(), student(), [dx.method("kd")], progress=True).fit(loader(x, y, 32, seed=0), 1)
    err = capsys.readouterr().err
    assert "student epoch 1/1" in err and "kd" in err and "samples/s" in err


def test_metrics_json_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    x, y, xv, yv = data(128)
    d = dx.Distiller(teacher(), student(), [dx.method("kd")], progress=False)
    d.fit(loader(x, y, 32, seed=0), 2, loader(xv, yv, 256, shuffle=False), teacher_epochs=1)
    d.save_metrics(str(tmp_path / "m.json"))
    d.plot(str(tmp_path / "m.png"))
    saved = json.loads((tmp_path / "m.json").read_text())
    assert {e["phase"] for e in saved["epochs"]} == {"teacher", "student"}
    assert all("val_accuracy" in e for e in saved["epochs"])
    assert len(saved["steps"]) == 4 + 2 * 4
    with open(tmp_path / "m.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
