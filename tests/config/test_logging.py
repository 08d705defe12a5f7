"""``[logging]`` in run configs: TensorBoard event files in output_dir/tensorboard, listed in the
outputs manifest (so --overwrite starts the curves again, --resume adds to them); bad entries name
their config key."""
from __future__ import annotations

import glob
import json
import sys

import pytest

from distillx.cli.run import main
from distillx.config import ConfigError, validate
from distillx.config.outputs import MANIFEST

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def run(out, *extra):
    return main(["digits", "--quiet", "--set", f"output_dir={out}", "--set", "teacher.epochs=1",
                 "--set", "student.epochs=1", "--set", "logging.loggers=[\"tensorboard\"]", *extra])


def events(out):
    return sorted(glob.glob(str(out / "tensorboard" / "events.out.tfevents.*")))


def test_tensorboard_from_a_config_and_overwrite_starts_the_curves_again(tmp_path):
    out = tmp_path / "out"
    assert run(out) == 0
    first = events(out)
    assert len(first) == 1
    acc = EventAccumulator(first[0])
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"teacher/loss", "student/kd", "student/lr", "student/epoch/val_accuracy"} <= set(tags)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(acc.Scalars("student/loss")) == len([s for s in metrics["steps"] if s["phase"] == "student"])
    manifest = json.loads((out / MANIFEST).read_text())["files"]
    assert [f for f in manifest if f.startswith("tensorboard/")] == [first[0][len(str(out)) + 1:]]
    (out / "tensorboard" / "notes.txt").write_text("mine")
    assert run(out, "--overwrite") == 0
    second = events(out)
    assert len(second) == 1 and second != first, "the previous run's event file is gone, a new one written"
    assert (out / "tensorboard" / "notes.txt").read_text() == "mine"


def test_logging_entries_are_checked(tmp_path, capsys):
    cfg = {"output_dir": "x", "data": {"builder": "a:b"}, "teacher": {"builder": "a:b"},
           "student": {"builder": "a:b", "epochs": 1}}
    assert validate(cfg)["logging"] == {"loggers": []}
    assert validate({**cfg, "logging": {"loggers": ["tensorboard", {"name": "tensorboard", "log_dir": "tb"}]}})[
        "logging"]["loggers"] == [{"name": "tensorboard"}, {"name": "tensorboard", "log_dir": "tb"}]
    for bad, words in (({"loggers": "tensorboard"}, "logging.loggers"), ({"loggers": [3]}, "logging.loggers.0"),
                       ({"logger": []}, "unknown key 'logging.logger'")):
        with pytest.raises(ConfigError) as info:
            validate({**cfg, "logging": bad})
        assert words in str(info.value)
    out = tmp_path / "out"
    assert run(out, "--set", "logging.loggers=[\"tensorbored\"]") == 2
    err = capsys.readouterr().err
    assert "logging.loggers.0: unknown logger 'tensorbored'; registered loggers: 'tensorboard'" in err


def test_a_missing_tensorboard_package_is_a_config_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert run(tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "logging.loggers:" in err and "distillx[tensorboard]" in err and "Traceback" not in err
