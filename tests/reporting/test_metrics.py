"""MetricsLog: records, JSON and state_dict round trips, atomic saves, non-finite values."""
import io
import json
import math
import os
import stat

import numpy as np
import pytest
import torch

from distillx.reporting import MetricsLog


def sample_log(keep_steps=True):
    log = MetricsLog(keep_steps=keep_steps)
    for phase, extra in (("teacher", {}), ("student", {"kd": 0.21})):
        for epoch in range(3):
            for step in range(2):
                log.log_step(phase, epoch, step, loss=1.0 / (epoch + step + 1), **extra)
            log.log_epoch(phase, epoch, loss=1.0 / (epoch + 1), task=0.5, val_accuracy=0.5 + epoch / 10,
                          val_loss=0.9, lr=1e-3, note="ok", **extra)
    return log


def strict_json(text):
    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_records_and_filters():
    log = sample_log()
    assert log.phases() == ["teacher", "student"]
    assert len(log) == 6 and len(log.epochs("student")) == 3
    first = log.epochs("student")[0]
    assert first == {"phase": "student", "epoch": 0, "loss": 1.0, "task": 0.5, "val_accuracy": 0.5,
                     "val_loss": 0.9, "lr": 1e-3, "note": "ok", "kd": 0.21}
    assert [r["step"] for r in log.steps("teacher", epoch=1)] == [0, 1]
    log.epochs()[0]["loss"] = 123.0  # copies: the log is not modified through them
    assert log.epochs()[0]["loss"] == 1.0


def test_log_epoch_replaces_the_same_phase_and_epoch():
    log = sample_log()
    log.log_epoch("student", 1, loss=0.01)
    student = log.epochs("student")
    assert [r["epoch"] for r in student] == [0, 1, 2]
    assert student[1] == {"phase": "student", "epoch": 1, "loss": 0.01}


def test_run_epochs_dicts_can_be_logged():
    history = [{"epoch": 0, "loss": 0.5, "task": 0.3, "kd": 0.2, "val_accuracy": 0.7, "val_loss": 0.6}]
    log = MetricsLog()
    for m in history:
        log.log_epoch("student", m["epoch"], **{k: v for k, v in m.items() if k != "epoch"})
    assert log.epochs() == [{"phase": "student", **history[0]}]


def test_keep_steps_false_is_compact():
    log = sample_log(keep_steps=False)
    assert log.steps() == [] and log.to_dict()["steps"] == []
    assert len(log.epochs()) == 6
    restored = MetricsLog(keep_steps=False)
    restored.load_state_dict(sample_log().state_dict())
    assert restored.steps() == [] and len(restored) == 6


def test_values_are_converted_to_plain_scalars():
    log = MetricsLog()
    log.log_epoch("student", 0, t=torch.tensor(0.25, requires_grad=True), i=torch.tensor(3), n=np.float32(0.5),
                  k=np.int64(7), b=True, s="x", none=None)
    rec = log.epochs()[0]
    assert rec == {"phase": "student", "epoch": 0, "t": 0.25, "i": 3, "n": 0.5, "k": 7, "b": True, "s": "x",
                   "none": None}
    assert type(rec["t"]) is float and type(rec["i"]) is int and type(rec["k"]) is int
    json.dumps(log.to_dict(), allow_nan=False)


@pytest.mark.parametrize("call", [
    lambda log: log.log_epoch("student", 0, x=torch.ones(2)),
    lambda log: log.log_epoch("student", 0, x=[1.0]),
    lambda log: log.log_step("student", 0, 0, x=object()),
])
def test_non_scalar_values_fail_when_logged(call):
    with pytest.raises(TypeError, match="'x'"):
        call(MetricsLog())


@pytest.mark.parametrize("call", [
    lambda log: log.log_epoch("", 0),
    lambda log: log.log_epoch(None, 0),
    lambda log: log.log_epoch("student", -1),
    lambda log: log.log_epoch("student", 1.5),
    lambda log: log.log_epoch("student", True),
    lambda log: log.log_step("student", 0, -2),
    lambda log: log.log_epoch("student", 0, step=3),
])
def test_invalid_records(call):
    with pytest.raises(ValueError):
        call(MetricsLog())


def test_json_round_trip(tmp_path):
    log = sample_log()
    path = tmp_path / "metrics.json"
    assert log.save_json(path) == str(path)
    data = strict_json(path.read_text())
    assert data["format"] == 1 and len(data["epochs"]) == 6 and len(data["steps"]) == 12
    loaded = MetricsLog.load_json(str(path))
    assert loaded == log
    assert loaded.epochs() == log.epochs() and loaded.steps() == log.steps()
    assert MetricsLog.load_json(path, keep_steps=False).steps() == []


def test_state_dict_round_trip_through_a_checkpoint():
    log = sample_log()
    buf = io.BytesIO()
    torch.save({"model": {}, "metrics": log.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # plain containers only
    resumed = MetricsLog()
    resumed.log_epoch("junk", 0, loss=1.0)  # replaced by the load
    resumed.load_state_dict(ckpt["metrics"])
    assert resumed == log and resumed.phases() == ["teacher", "student"]
    resumed.log_epoch("student", 3, loss=0.1)  # training goes on after a resume
    assert [r["epoch"] for r in resumed.epochs("student")] == [0, 1, 2, 3]
    assert MetricsLog.from_dict(log.to_dict()) == log


def test_state_dict_is_independent_of_the_log():
    log = sample_log()
    state = log.state_dict()
    state["epochs"][0]["loss"] = -1.0
    assert log.epochs()[0]["loss"] == 1.0


@pytest.mark.parametrize("state, error", [
    ({"format": 2, "epochs": []}, ValueError),
    ({"epochs": []}, ValueError),
    ({"format": 1, "epochs": {}}, ValueError),
    ({"format": 1, "epochs": [{"phase": "student"}]}, ValueError),
    ({"format": 1, "epochs": [{"phase": "student", "epoch": -1}]}, ValueError),
    ({"format": 1, "epochs": [{"phase": "student", "epoch": 0, "x": [1]}]}, TypeError),
    ([], TypeError),
])
def test_load_state_dict_validates_and_leaves_the_log_unchanged(state, error):
    log = sample_log()
    before = log.to_dict()
    with pytest.raises(error):
        log.load_state_dict(state)
    assert log.to_dict() == before


def test_non_finite_values(tmp_path):
    log = MetricsLog()
    log.log_epoch("student", 0, loss=float("nan"), task=float("inf"), kd=float("-inf"), val_accuracy=0.5)
    log.log_step("student", 0, 7, loss=torch.tensor(float("nan")))
    rec = log.epochs()[0]
    assert math.isnan(rec["loss"]) and rec["task"] == math.inf and rec["kd"] == -math.inf  # floats in memory
    data = log.to_dict()
    assert data["epochs"][0] == {"phase": "student", "epoch": 0, "loss": "NaN", "task": "Infinity",
                                 "kd": "-Infinity", "val_accuracy": 0.5}
    assert data["steps"][0]["loss"] == "NaN"
    json.dumps(data, allow_nan=False)  # strict JSON
    path = tmp_path / "m.json"
    log.save_json(path)
    strict_json(path.read_text())
    for loaded in (MetricsLog.load_json(path), MetricsLog.from_dict(log.state_dict())):
        rec = loaded.epochs()[0]
        assert math.isnan(rec["loss"]) and rec["task"] == math.inf and rec["kd"] == -math.inf
        assert math.isnan(loaded.steps()[0]["loss"])
        assert loaded == log


def test_bare_json_nan_tokens_are_read_too(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"format": 1, "epochs": [{"phase": "teacher", "epoch": 0, "loss": NaN}]}')
    assert math.isnan(MetricsLog.load_json(path).epochs()[0]["loss"])


def test_atomic_save_leaves_no_temp_files(tmp_path):
    log = sample_log()
    for _ in range(3):
        log.save_json(tmp_path / "metrics.json")
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_failed_serialisation_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    sample_log().save_json(path)
    before = path.read_bytes()
    broken = sample_log()
    # Fails half-way through json.dump, after the temporary file was created and partly written.
    monkeypatch.setattr(broken, "to_dict", lambda: {"format": 1, "epochs": [{"x": 1.0}, {"y": object()}]})
    with pytest.raises(TypeError):
        broken.save_json(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_failed_replace_cleans_up(tmp_path):
    target = tmp_path / "adir"
    target.mkdir()
    with pytest.raises(OSError):
        sample_log().save_json(target)
    assert os.listdir(tmp_path) == ["adir"] and os.listdir(target) == []


def test_saved_file_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = tmp_path / "metrics.json"
        sample_log().save_json(path)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0o600
