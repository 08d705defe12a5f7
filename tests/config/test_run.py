"""``distillx run`` end to end (in-process ``main(argv)``, one real subprocess): outputs, resume,
and the exit status and message of each failure (bad teacher checkpoint, empty data, NaN loss)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import distillx as dx
from distillx.config import ConfigError, load
from distillx.config.data import digits
from distillx.cli.run import main
from distillx.demo import mlp
from distillx.engine import checkpoint as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HERE = __name__  # data builders below are named "<this module>:<function>" in configs


# -- data builders used by the configs of these tests --------------------------------------------
def empty_data():
    from distillx.data import tensor_loader

    return {"train": tensor_loader(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long), 8), "val": None}


class _Unsized:
    def __iter__(self):
        return iter(())


def unsized_empty_data():
    return {"train": _Unsized(), "val": None}


class _NaNFromPass:
    """The wrapped loader's batches; from its ``first``-th pass on (0-based), every input is NaN."""

    def __init__(self, loader, first: int):
        self.loader, self.first, self.passes = loader, first, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        poisoned = self.passes >= self.first
        self.passes += 1
        for x, y in self.loader:
            yield (torch.full_like(x, float("nan")) if poisoned else x), y


def nan_digits(nan_from_pass: int = 1, **options):
    """The digits builder whose training inputs turn NaN from the ``nan_from_pass``-th pass on."""
    data = digits(**options)
    return {"train": _NaNFromPass(data["train"], nan_from_pass), "val": data["val"]}


class _SigintAt:
    """The wrapped loader's batches; before batch ``step`` of pass ``first`` sends SIGINT to this
    process (``how="sigint"``) or raises RuntimeError (``how="crash"``: a run that dies)."""

    def __init__(self, loader, first: int, step: int, how: str = "sigint"):
        self.loader, self.first, self.step, self.how, self.passes = loader, first, step, how, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        this, self.passes = self.passes, self.passes + 1
        for i, batch in enumerate(self.loader):
            if this == self.first and i == self.step:
                if self.how == "crash":
                    raise RuntimeError(f"killed in pass {this}, batch {i}")
                os.kill(os.getpid(), signal.SIGINT)
            yield batch


def interrupted_digits(interrupt_pass: int = -1, interrupt_step: int = 5, how: str = "sigint", **options):
    data = digits(**options)
    return {"train": _SigintAt(data["train"], interrupt_pass, interrupt_step, how), "val": data["val"]}


def not_loaders():
    return {"training": [], "val": None}


# -- helpers -------------------------------------------------------------------------------------
def run(tmp_path, *extra, epochs=(1, 1), name="run"):
    out = tmp_path / name
    argv = ["digits", "--quiet", "--set", f"output_dir={out}", "--set", f"teacher.epochs={epochs[0]}",
            "--set", f"student.epochs={epochs[1]}", *extra]
    return main(argv), out


def student_state(out):
    return torch.load(out / "student.pt", weights_only=True)


def epochs_logged(out, phase):
    return [r["epoch"] for r in json.loads((out / "metrics.json").read_text())["epochs"] if r["phase"] == phase]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished run of the bundled config (teacher 1 epoch, student 1 epoch) and its stdout."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("finished")
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code, out = run(tmp)
    assert code == 0
    # main() leaves the caller's thread count and global generator as they were
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), rng)
    return out, stdout.getvalue()


# -- a finished run --------------------------------------------------------------------------------
def test_run_writes_every_output(finished):
    out, stdout = finished
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.json", "distillx-outputs.json", "metrics.json",
                                       "metrics.png", "student.pt", "teacher.pt"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(r["phase"], r["epoch"]) for r in metrics["epochs"]] == [("teacher", 0), ("student", 0)]
    assert 0 < metrics["epochs"][1]["val_accuracy"] <= 1 and "kd" in metrics["epochs"][1]
    assert len(metrics["steps"]) == 2 * 22  # 1,347 training digits in batches of 64, both phases
    assert (out / "metrics.png").read_bytes()[:8] == PNG_SIGNATURE
    student = mlp((64, 32, 10))
    student.load_state_dict(student_state(out))  # a plain state dict of the configured architecture
    mlp((64, 256, 256, 10), 0.5).load_state_dict(torch.load(out / "teacher.pt", weights_only=True))
    state = ckpt.load(str(out / "checkpoint.pt"))
    assert state["phase"] == "student" and state["position"]["epoch"] == 1
    # config.json is the resolved config of the run, and runs as is
    config = json.loads((out / "config.json").read_text())
    assert config == load("digits", [f"output_dir={out}", "teacher.epochs=1", "student.epochs=1"])
    assert load(str(out / "config.json")) == config
    # the summary: both accuracies and the paths written
    assert "teacher" in stdout and "student" in stdout and stdout.count("val accuracy") == 2
    assert str(out / "student.pt") in stdout and str(out / "metrics.png") in stdout


def test_resume_after_a_finished_run_trains_nothing(finished, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished[0], out)  # the module's run stays untouched for the other tests
    before = student_state(out)
    code, _ = run(tmp_path, "--resume")
    assert code == 0
    assert "nothing left to train" in capsys.readouterr().err
    after = student_state(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert epochs_logged(out, "student") == [0] and epochs_logged(out, "teacher") == [0]

    # raising student.epochs continues from the checkpoint: one more student epoch, no teacher epoch
    code, _ = run(tmp_path, "--resume", epochs=(1, 2))
    assert code == 0
    err = capsys.readouterr().err
    assert "differs from the previous run's config.json: student.epochs: 1 -> 2" in err
    assert epochs_logged(out, "student") == [0, 1] and epochs_logged(out, "teacher") == [0]
    assert json.loads((out / "config.json").read_text())["student"]["epochs"] == 2


def test_an_existing_run_needs_resume_or_overwrite(finished, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    code, _ = run(tmp_path)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"distillx run: output_dir {str(out)!r} already holds a run (checkpoint.pt); pass --resume")
    code, _ = run(tmp_path, "--overwrite", "--set", "data.options.batch_size=1000", epochs=(0, 1))
    assert code == 0
    assert not (out / "teacher.pt").exists()  # the earlier run's files went; this run trains no teacher
    assert epochs_logged(out, "teacher") == []


def test_resume_without_a_checkpoint(tmp_path, capsys):
    code, out = run(tmp_path, "--resume")
    assert code == 2
    assert f"--resume: there is no checkpoint to continue at {str(out / 'checkpoint.pt')!r}" in capsys.readouterr().err


def test_a_saved_teacher_is_loaded_with_teacher_checkpoint(finished, tmp_path, capsys):
    out, stdout = finished
    code, _ = run(tmp_path, "--set", f"teacher.checkpoint={out / 'teacher.pt'}", "--set",
                  "data.options.batch_size=1000", epochs=(0, 1))
    assert code == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("teacher"))
    assert "loaded from teacher.checkpoint" in line
    # the same accuracy as the teacher that was saved
    saved = next(x for x in stdout.splitlines() if x.strip().startswith("teacher"))
    accuracy = saved.split("val accuracy")[1].split()[0]
    assert accuracy in line


# -- failures: exit status and message -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mismatch", "garbage", "missing"])
def test_a_teacher_checkpoint_that_does_not_load(finished, tmp_path, capsys, kind):
    path = {"mismatch": finished[0] / "student.pt", "garbage": tmp_path / "garbage.pt",
            "missing": tmp_path / "missing.pt"}[kind]
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint")
    code, out = run(tmp_path, "--set", f"teacher.checkpoint={path}")
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("distillx run: teacher.checkpoint: ") and repr(str(path)) in err
    expected = {"mismatch": "does not match the teacher built by teacher.builder: missing from the checkpoint: 3.bias",
                "garbage": "does not load as a state dict with torch.load(weights_only=True)",
                "missing": "does not exist"}[kind]
    assert expected in err and "Traceback" not in err
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize("builder, expected", [
    ("empty_data", "data: the train loader of '{b}' is empty: it yields no batches (check data.options: the data "
                   "set may be empty or smaller than one batch with drop_last)"),
    ("unsized_empty_data", "train_loader is empty: it yields no batches"),  # found by the Distiller
    ("not_loaders", "data: '{b}' must return {{'train': loader, 'val': loader or None}}, got a mapping with keys "
                    "['training', 'val']"),
])
def test_empty_or_wrong_data_is_exit_2(tmp_path, capsys, builder, expected):
    spec = f"{HERE}:{builder}"
    code, _ = run(tmp_path, "--set", f"data.builder={spec}", "--set", "data.options={}", epochs=(0, 1))
    assert code == 2
    err = capsys.readouterr().err
    assert err == f"distillx run: {expected.format(b=spec)}\n"


def test_a_nan_loss_is_exit_3_and_keeps_the_last_checkpoint(tmp_path, capsys):
    code, out = run(tmp_path, "--set", f"data.builder={HERE}:nan_digits", "--set", "data.options.nan_from_pass=1",
                    epochs=(0, 3))
    assert code == 3
    err = capsys.readouterr().err
    assert err.startswith("distillx run: phase 'student', epoch 1, step 1: method 'kd': its loss is nan")
    assert f"the last checkpoint ({out / 'checkpoint.pt'}) is kept" in err
    state = ckpt.load(str(out / "checkpoint.pt"))
    assert state["phase"] == "student" and state["position"]["epoch"] == 1  # the end of the clean epoch
    assert all(torch.isfinite(v).all() for v in state["student"].values())
    assert epochs_logged(out, "student") == [0]  # metrics up to the failure are written
    assert not (out / "student.pt").exists()


def test_an_interrupted_run_is_exit_130_and_resumes(tmp_path, capsys):
    data = ["--set", f"data.builder={HERE}:interrupted_digits"]
    code, out = run(tmp_path, *data, "--set", "data.options.interrupt_pass=1", epochs=(1, 1))
    assert code == 130  # pass 0 is the teacher's epoch, pass 1 the student's
    err = capsys.readouterr().err
    assert "training interrupted by signal 2 in phase 'student' at epoch 0, step 6" in err
    assert "continue with: distillx run digits --set " in err and err.rstrip().endswith("--resume")
    assert ckpt.load(str(out / "checkpoint.pt"))["position"]["step"] == 6
    code, _ = run(tmp_path, *data, "--resume", epochs=(1, 1))  # interrupt_pass back to -1: no signal
    assert code == 0
    assert epochs_logged(out, "student") == [0] and (out / "student.pt").is_file()


NOISE = ["--set", 'augmentations=[{"name": "noise", "std": 0.1}]', "--set", f"data.builder={HERE}:interrupted_digits"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The digits config with noise augmentation, teacher 2 epochs, student 2, run without a stop."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    code, out = run(tmp, *NOISE, epochs=(2, 2))
    assert code == 0
    return out


@pytest.mark.parametrize("how, interrupt_pass, step, exit_code, phase", [
    ("sigint", 1, 5, 130, "teacher"),     # mid teacher epoch 1: a checkpoint of the exact step
    ("sigint", 2, 0, 130, "student"),     # the first student step
    ("crash", 2, 9, 1, "teacher"),        # dies in the first student epoch: resumes from the teacher's end
    ("sigint", 3, 11, 130, "student"),    # mid student epoch 1
    ("crash", 3, 11, 1, "student"),       # dies in student epoch 1: resumes from its start
], ids=["sigint-teacher", "sigint-student-step0", "crash-first-student-epoch", "sigint-mid-student",
        "crash-mid-student"])
def test_an_interrupted_run_with_augmentation_resumes_bitwise(uninterrupted, tmp_path, capsys, how, interrupt_pass,
                                                              step, exit_code, phase):
    stop = ["--set", f"data.options.interrupt_pass={interrupt_pass}", "--set", f"data.options.interrupt_step={step}",
            "--set", f"data.options.how={how}"]
    code, out = run(tmp_path, *NOISE, *stop, epochs=(2, 2))
    assert code == exit_code, capsys.readouterr().err
    assert ckpt.load(str(out / "checkpoint.pt"))["phase"] == phase
    torch.manual_seed(99)  # the resumed process starts from another state
    code, _ = run(tmp_path, *NOISE, "--resume", epochs=(2, 2))
    assert code == 0, capsys.readouterr().err
    for name in ("student.pt", "teacher.pt"):
        a = torch.load(uninterrupted / name, weights_only=True)
        b = torch.load(out / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert epochs_logged(out, "student") == [0, 1] and epochs_logged(out, "teacher") == [0, 1]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("damage", ["crafted", "zeroed", "incomplete"])
def test_resume_refuses_a_crafted_or_damaged_checkpoint(finished, tmp_path, capsys, damage):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    path = out / "checkpoint.pt"
    marker = tmp_path / "code-ran"
    if damage == "zeroed":
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
        path.write_bytes(raw)
    else:
        content = torch.load(path, weights_only=False)  # our own file
        if damage == "crafted":
            content["metrics"] = _RunsCode(marker)
        else:
            del content["phase"]
        torch.save(content, path)
    before = student_state(out)
    code, _ = run(tmp_path, "--resume", epochs=(1, 2))
    assert code == 2
    err = capsys.readouterr().err
    expected = {"crafted": "holds objects other than tensors and plain values, which a safe load refuses",
                "zeroed": "is corrupt: the data of", "incomplete": "is not usable: it is incomplete: missing phase"}
    assert err.startswith(f"distillx run: --resume: checkpoint {str(path)!r} {expected[damage]}"), err
    assert not marker.exists(), "nothing from the checkpoint was executed"
    after = student_state(out)
    assert all(torch.equal(before[k], after[k]) for k in before), "the run did not start"


def test_output_dir_with_files_distillx_did_not_write_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}\n')
    (out / "metrics.json").write_text('{"accuracy": 0.99}\n')
    code, _ = run(tmp_path, epochs=(0, 1))
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"distillx run: output_dir {str(out)!r} is not empty (config.json, metrics.json) and its "
                          "config.json is not this run's config; a run would replace config.json, metrics.json."), err
    assert (out / "config.json").read_text() == '{"mine": true}\n'
    assert (out / "metrics.json").read_text() == '{"accuracy": 0.99}\n'
    assert sorted(os.listdir(out)) == ["config.json", "metrics.json"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README").write_text("mine")
    code, _ = run(tmp_path, epochs=(0, 1), name="notes")
    assert code == 2 and "is not empty (README) and it holds no distillx run" in capsys.readouterr().err
    # --overwrite replaces distillx's outputs there and leaves other files alone
    (out / "notes.txt").write_text("keep me")
    code, _ = run(tmp_path, "--overwrite", epochs=(0, 1))
    assert code == 0
    assert json.loads((out / "config.json").read_text())["output_dir"] == str(out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_an_output_dir_that_cannot_be_written_is_exit_2(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a directory")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "run"):
        code = main(["digits", "--quiet", "--set", f"output_dir={out}", "--set", "teacher.epochs=1",
                     "--set", "student.epochs=1"])
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"distillx run: output_dir {str(out)!r} "), err
        assert "Traceback" not in err and "training failed" not in err


def test_an_earlier_attempt_of_the_same_config_may_be_rerun(tmp_path, capsys):
    """A run that stopped before its first checkpoint left config.json (and metrics.json): running
    the same config again is allowed, another config is not."""
    code, out = run(tmp_path, "--set", f"data.builder={HERE}:nan_digits", "--set", "data.options.nan_from_pass=0",
                    epochs=(0, 1))
    assert code == 3 and sorted(os.listdir(out)) == ["config.json", "distillx-outputs.json", "metrics.json"]
    capsys.readouterr()
    code, _ = run(tmp_path, "--set", f"data.builder={HERE}:nan_digits", "--set", "data.options.nan_from_pass=0",
                  epochs=(0, 1))
    assert code == 3 and "its loss is nan" in capsys.readouterr().err
    code, _ = run(tmp_path, epochs=(0, 1))
    assert code == 2 and "its config.json is not this run's config" in capsys.readouterr().err


def test_a_missing_config_file(tmp_path, capsys):
    assert main([str(tmp_path / "nope.toml")]) == 2
    assert capsys.readouterr().err == (f"distillx run: config {str(tmp_path / 'nope.toml')!r}: no such file, and no "
                                       "bundled config of that name (bundled: digits)\n")


@pytest.mark.parametrize("override, expected", [
    ("methods.0.TT=4", "methods.0 ('kd'): method 'kd' got an unknown option 'TT'; valid options: T, beta, divergence, "
                       "weight"),
    ("data.options.bs=32", "data: distillx.config.data:digits(**data.options) failed: TypeError: digits() got an "
                           "unexpected keyword argument 'bs'"),
    ("student.options.width=[64, 10]", "student: distillx.demo:mlp(**student.options) failed: TypeError: mlp() got an "
                                       "unexpected keyword argument 'width'"),
    ("transfer.name=selekt", "transfer ('selekt'): unknown weight transfer 'selekt'; registered weight transfers: "),
    ("augmentations=[{\"name\": \"noise\", \"sdt\": 1}]", "augmentations.0 ('noise'): augmentation 'noise' got an "
                                                          "unknown option 'sdt'; valid options: std"),
    ("data.builder=distillx.config.data:nope", "data.builder: module 'distillx.config.data' has no attribute 'nope'"),
])
def test_option_errors_name_the_config_key(tmp_path, capsys, override, expected):
    code, out = run(tmp_path, "--set", override)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"distillx run: {expected}") and "Traceback" not in err
    assert not out.exists()


def test_a_run_with_balanced_loss_terms_logs_and_saves_the_factors(tmp_path, capsys):
    code, out = run(tmp_path, "--set", 'methods=[{"name": "kd", "T": 2.0}, {"name": "sld"}]',
                    "--set", "training.balance=auto", "--set", "training.balance_every=5")
    assert code == 0, capsys.readouterr().err
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    student = [r for r in steps if r["phase"] == "student"]
    assert all({"weight/kd", "weight/sld"} <= set(r) and r["weight/kd"] == 1.0 for r in student)
    assert not any(k.startswith("weight/") for r in steps if r["phase"] == "teacher" for k in r)
    saved = ckpt.load(str(out / "checkpoint.pt"))["balance"]
    assert (saved["mode"], saved["primary"], saved["every"], saved["steps"]) == ("auto", "kd", 5, 22)
    assert json.loads((out / "config.json").read_text())["training"]["balance"] == "auto"


@pytest.mark.parametrize("override, expected", [
    (["training.balance=always"], "training.balance: expected one of 'auto', got 'always'"),
    (["training.balance=auto", "training.balance_primary=sld"],
     "cannot set up the distillation: balance_primary must be one of the loss terms 'task', 'kd', got 'sld'"),
    (["training.balance_every=3"], "cannot set up the distillation: balance_every=3 is set but balance is None"),
])
def test_balance_errors_name_the_key(tmp_path, capsys, override, expected):
    code, out = run(tmp_path, *[a for o in override for a in ("--set", o)])
    assert code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not out.exists()


# -- the real command line ---------------------------------------------------------------------------
def test_the_distillx_cli_dispatches_run(tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "DISTILLX_QUIET": "1"}
    proc = subprocess.run([sys.executable, "-m", "distillx.cli", "run", "digits", "--set", f"output_dir={out}",
                           "--set", "teacher.epochs=0", "--set", "student.epochs=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "distillx run: bundled config 'digits.toml' ->" in proc.stdout and proc.stderr == ""
    assert (out / "student.pt").is_file() and (out / "metrics.json").is_file()


def test_a_student_on_the_teachers_features_writes_the_composed_model(tmp_path, capsys):
    out = tmp_path / "head"
    rc = main(["digits", "--set", f"output_dir={out}", "--set", "teacher.epochs=2", "--set", "student.epochs=2",
               "--set", "student.input=teacher:4", "--set", "student.options.widths=[256, 16, 10]", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert "composed.pt" in os.listdir(out)
    teacher, head = mlp((64, 256, 256, 10), 0.5), mlp((256, 16, 10))
    teacher.load_state_dict(torch.load(out / "teacher.pt", weights_only=True))
    head.load_state_dict(student_state(out))
    composed = dx.load_composed(out / "composed.pt", mlp((64, 256, 256, 10), 0.5), mlp((256, 16, 10))).eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(composed(x), head(teacher.eval()[:5](x)))
    assert "val accuracy" in capsys.readouterr().out
    with pytest.raises(ConfigError, match='student.input: .* "teacher:PATH"'):
        load("digits", ["output_dir=x", "student.input=layer4"])
