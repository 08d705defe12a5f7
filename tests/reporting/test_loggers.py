"""Metrics loggers: TensorBoard event files read back hold every step and epoch record the Distiller
logs (both phases, each term, lr, validation); plugin loggers by name; bad specs name the argument;
a failing logger is dropped without stopping training; only the main process builds loggers."""
from __future__ import annotations

import glob
import sys
import warnings

import pytest
import torch

import distillx as dx
from distillx.data import digits_split
from distillx.engine.arguments import build_loggers
from distillx.engine.loop import Phase, Runner
from distillx.loggers import Logger, LoggerWarning, TensorBoardLogger
from distillx.plugin import UnknownNameError, get_plugin_manager, hookimpl
from distillx.testing import data, loader, student, teacher

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every event file under ``log_dir``: tag -> [(step, value)] in write order."""
    out: dict[str, list] = {}
    for path in sorted(glob.glob(f"{log_dir}/events.out.tfevents.*")):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


class Recording(Logger):
    """Keeps what it is given (and how it was built)."""

    built: list = []

    def __init__(self, run_dir=None, tag="r"):
        self.run_dir, self.tag, self.steps, self.epochs, self.closed = run_dir, tag, [], [], 0
        Recording.built.append(self)

    def log_step(self, phase, step, values):
        self.steps.append((phase, step, dict(values)))

    def log_epoch(self, phase, epoch, values):
        self.epochs.append((phase, epoch, dict(values)))

    def close(self):
        self.closed += 1


class Broken(Recording):
    def log_step(self, phase, step, values):
        raise ConnectionError("the tracking server is down")


class _Plugin:
    @hookimpl
    def distillx_register_loggers(self, registry):
        registry.add("recording", Recording)
        registry.add("broken", Broken)


@pytest.fixture
def plugin():
    Recording.built = []
    get_plugin_manager().register(_Plugin(), "test-loggers")


def distiller(tmp_path, **kw):
    x, y, xv, yv = data(128)
    kw.setdefault("checkpoint_dir", str(tmp_path / "run"))
    d = dx.Distiller(teacher(), student(), [dx.method("kd", T=2.0, weight=0.5)], progress=False, **kw)
    return d, loader(x, y, 32, seed=0), loader(xv, yv, 64, shuffle=False)


def test_tensorboard_holds_every_step_and_epoch_record_of_both_phases(tmp_path):
    d, train, val = distiller(tmp_path, loggers=["tensorboard"], warmup=2)
    d.fit(train, epochs=2, val_loader=val, teacher_epochs=1)
    d.close()
    tb = scalars(tmp_path / "run" / "tensorboard")
    steps = d.metrics.steps("student")
    assert len(steps) == 8 and {"loss", "task", "kd", "lr"} <= set(steps[0])
    for key in ("loss", "task", "kd", "lr"):
        assert [s for s, _ in tb[f"student/{key}"]] == list(range(1, 9))  # the phase's step count
        assert [v for _, v in tb[f"student/{key}"]] == pytest.approx([r[key] for r in steps], rel=1e-6)
    lrs = [r["lr"] for r in steps]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[2], "warm-up then decay: the learning rate each step used"
    assert [v for _, v in tb["teacher/loss"]] == pytest.approx([r["loss"] for r in d.metrics.steps("teacher")],
                                                               rel=1e-6)
    for phase in ("teacher", "student"):
        for record in d.metrics.epochs(phase):
            for key in ("loss", "val_accuracy", "val_loss"):
                assert (record["epoch"], pytest.approx(record[key], rel=1e-6)) in tb[f"{phase}/epoch/{key}"]
    assert len(tb["student/epoch/val_accuracy"]) == 2 and len(tb["teacher/epoch/loss"]) == 1


def test_log_dir_option_and_a_later_fit_reopens_the_writer(tmp_path):
    d, train, _ = distiller(tmp_path, checkpoint_dir=None, loggers=[{"name": "tensorboard", "log_dir": str(tmp_path / "tb")}])
    d.fit(train, epochs=1)
    d.close()  # closes the writer; the second fit writes a second event file in the same directory
    d.fit(train, epochs=1)
    d.close()
    assert len(glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))) == 2
    assert len(scalars(tmp_path / "tb")["student/kd"]) == 8


@pytest.mark.parametrize("spec, error, words", [
    (["nope"], UnknownNameError, ["unknown logger 'nope'", "tensorboard"]),
    ([True], TypeError, ["loggers[0]", "log_step"]),
    ([3], TypeError, ["loggers[0]", "log_epoch"]),
    ([{"log_dir": "x"}], ValueError, ["loggers[0]", "'name'"]),
    ([{"name": "tensorboard", "flush_secs": "10"}], ValueError, ["flush_secs", "int"]),
    ([{"name": "tensorboard", "colour": "red"}], TypeError, ["logger 'tensorboard'", "colour"]),
    ([{"name": "tensorboard", "log_dir": 5}], TypeError, ["log_dir", "5"]),
])
def test_bad_logger_specs_name_the_argument(tmp_path, spec, error, words):
    with pytest.raises(error) as info:
        distiller(tmp_path, loggers=spec)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_tensorboard_needs_a_directory(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_dir is None"):
        distiller(tmp_path, checkpoint_dir=None, loggers="tensorboard")


def test_missing_tensorboard_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"distillx\[tensorboard\]"):
        distiller(tmp_path, loggers=["tensorboard"])
    with pytest.raises(ImportError, match=r"distillx\[tensorboard\]"):
        TensorBoardLogger(log_dir=str(tmp_path))


def test_plugin_loggers_by_name_get_the_run_dir_options_and_every_record(tmp_path, plugin):
    d, train, val = distiller(tmp_path, loggers=[{"name": "recording", "tag": "x"}, "recording"])
    d.fit(train, epochs=2, val_loader=val)
    first, second = Recording.built
    assert first.run_dir == str(tmp_path / "run") and first.tag == "x" and second.tag == "r"
    expected = [("student", i + 1, {k: v for k, v in r.items() if k not in ("phase", "epoch", "step")})
                for i, r in enumerate(d.metrics.steps("student"))]
    assert first.steps == expected == second.steps
    assert [(p, e, v["val_accuracy"]) for p, e, v in first.epochs] == [
        ("student", r["epoch"], r["val_accuracy"]) for r in d.metrics.epochs("student")]
    d.close()
    assert first.closed == 1


def test_a_logger_that_raises_is_dropped_and_training_goes_on(tmp_path, plugin):
    d, train, _ = distiller(tmp_path, loggers=["broken", "recording"])
    with pytest.warns(LoggerWarning, match=r"logger 'broken' failed in log_step\(\).*tracking server is down"):
        history = d.fit(train, epochs=2)
    assert len(history) == 2 and len(d.metrics.steps("student")) == 8
    broken, recording = Recording.built
    assert len(recording.steps) == 8 and broken.epochs == [], "dropped after its first failure"
    assert d.loggers.names == ["recording"] and d.loggers.failed[0][0] == "broken"


def test_only_the_main_process_builds_loggers_but_every_process_checks_names(plugin):
    assert not build_loggers(["recording", {"name": "recording"}], "run", is_main=False)
    assert Recording.built == []
    with pytest.raises(UnknownNameError, match="unknown logger 'nope'"):
        build_loggers(["nope"], "run", is_main=False)
    assert len(build_loggers(["recording"], "run", is_main=True)) == 1


def test_a_runner_off_the_main_process_does_not_log(plugin):
    class Rank1:
        rank, world_size, enabled, is_main = 1, 1, False, False

        def all_reduce_sum(self, t):
            return t

        def any(self, flag):
            return flag

    x, y, _, _ = data(64)
    model = torch.nn.Linear(64, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recording()
    losses = lambda i, t, _: {"loss": torch.nn.functional.cross_entropy(model(i), t)}  # noqa: E731
    for ctx, expected in ((Rank1(), 0), (dx.engine.distributed.DistContext(), 2)):
        phase = Phase("student", [model], opt, loader(x, y, 32), 1, losses, torch.device("cpu"))
        Runner(phase, ctx, loggers=build_loggers([rec], None, True)).run()
        assert len(rec.steps) == expected


def test_a_loader_without_length_counts_steps_across_epochs(plugin):
    x, y, _, _ = data(64)
    model = torch.nn.Linear(64, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class NoLen:
        def __iter__(self):
            return iter(loader(x, y, 32, shuffle=False))

    rec = Recording()
    losses = lambda i, t, _: {"loss": torch.nn.functional.cross_entropy(model(i), t)}  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Runner(Phase("student", [model], opt, NoLen(), 2, losses, torch.device("cpu")),
               loggers=build_loggers([rec], None, True)).run()
    assert [s for _, s, _ in rec.steps] == [1, 2, 3, 4] and [e for _, e, _ in rec.epochs] == [0, 1]


def readme_example(name: str) -> str:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    return dict(re.findall(r"```python\n# example: ([^\n]+)\n(.*?)```", text, flags=re.S))[name]


def test_the_readme_examples_write_what_they_say(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("tensorboard", "logger plugin"):
        code = readme_example(name).replace("/tmp/", f"{tmp_path}/")
        exec(compile(code, f"README.md example {name!r}", "exec"), {"__name__": "__readme__"})
    steps = -(-len(digits_split(0.25, 0).x_train) // 64)  # batches of 64 per epoch
    tb = scalars(tmp_path / "runs" / "tb" / "tensorboard")
    assert len(tb["student/kd"]) == 2 * steps and len(tb["teacher/epoch/val_accuracy"]) == 2
    lines = (tmp_path / "curves.jsonl").read_text().splitlines()
    assert len(lines) == steps + 1 and '"epoch": 0' in lines[-1] and '"lr"' in lines[0]
    assert "accuracy" in capsys.readouterr().out
