"""``distillx transfer``: two checkpoints in, a report out, the student written atomically only with --out;
state dicts need an architecture, pickled models need --allow-pickle, bad inputs are clear errors."""
from __future__ import annotations

import io
import json
import os
import textwrap

import pytest
import torch
from torch import nn

from distillx.cli import main as cli

ARCH = textwrap.dedent("""
    import torch
    from torch import nn

    def teacher():
        return nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 5))

    def student():
        return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
""")


@pytest.fixture
def arch(tmp_path, monkeypatch):
    (tmp_path / "cli_arch_models.py").write_text(ARCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    import cli_arch_models
    torch.manual_seed(0)
    t, s = cli_arch_models.teacher(), cli_arch_models.student()
    torch.save(t.state_dict(), tmp_path / "teacher.pt")
    torch.save({"state_dict": s.state_dict()}, tmp_path / "student.pt")
    return tmp_path, t, s


def _args(tmp, *extra):
    return ["transfer", "select", "--teacher", str(tmp / "teacher.pt"), "--student", str(tmp / "student.pt"),
            "--teacher-arch", "cli_arch_models:teacher", "--student-arch", "cli_arch_models:student", *extra]


def test_state_dicts_report_and_atomic_out(arch, capsys):
    tmp, t, s = arch
    before = (tmp / "student.pt").read_bytes()
    assert cli(_args(tmp, "--out", str(tmp / "init.pt"), "--json", str(tmp / "report.json"))) == 0
    out = capsys.readouterr().out
    assert "0.weight" in out and "2.weight" in out and "wrote the initialised student" in out
    report = json.loads((tmp / "report.json").read_text())
    assert report["strategy"] == "select"
    assert (tmp / "student.pt").read_bytes() == before, "the input checkpoint is never modified"
    assert not [f for f in os.listdir(tmp) if f.endswith(".tmp")], "no temporary file left behind"
    written = torch.load(tmp / "init.pt", weights_only=True)
    # select keeps all 5 output rows and a uniform choice of 16 of the 64 hidden units
    rows = [i for i in range(64) if any(torch.equal(written["0.weight"][j], t[0].weight[i]) for j in range(16))]
    assert len(rows) == 16
    assert torch.equal(written["2.weight"], t[2].weight[:, rows].detach())


def test_dry_run_writes_nothing_and_json_to_stdout(arch, capsys):
    tmp, _, _ = arch
    files = set(os.listdir(tmp))
    assert cli(_args(tmp, "--json", "-", "--option", "layers=uniform")) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["strategy"] == "select" and set(os.listdir(tmp)) == files


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickled_models_need_allow_pickle(tmp_path, capsys, zip_format):
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3)), tmp_path / "t.pt",
               _use_new_zipfile_serialization=zip_format)
    torch.save(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), tmp_path / "s.pt",
               _use_new_zipfile_serialization=zip_format)
    args = ["transfer", "direct", "--teacher", str(tmp_path / "t.pt"), "--student", str(tmp_path / "s.pt")]
    with pytest.raises(SystemExit, match="--allow-pickle"):
        cli(args)
    assert cli(args + ["--allow-pickle", "--out", str(tmp_path / "o.pt")]) == 0
    assert isinstance(torch.load(tmp_path / "o.pt", weights_only=False), nn.Sequential)


@pytest.mark.parametrize("change,match", [
    (lambda a: [x if x != "cli_arch_models:student" else "cli_arch_models:nope" for x in a], "cannot import"),
    (lambda a: [x for x in a if x not in ("--student-arch", "cli_arch_models:student")], "--student-arch"),
    (lambda a: [x if x != "cli_arch_models:student" else "cli_arch_models:teacher" for x in a], "does not fit"),
    (lambda a: [x if not x.endswith("teacher.pt") else x + ".missing" for x in a], "does not exist"),
])
def test_bad_inputs(arch, change, match):
    tmp, _, _ = arch
    with pytest.raises(SystemExit, match=match):
        cli(change(_args(tmp)))


def test_unknown_option_is_reported(arch, capsys):
    tmp, _, _ = arch
    assert cli(_args(tmp, "--option", "nonsense=1")) == 2
    assert "nonsense" in capsys.readouterr().err


RAISING_ARCH = textwrap.dedent("""
    def broken():
        raise RuntimeError("the config file for this model is missing")
""")


def test_a_builder_that_raises_is_a_clear_error(arch, capsys):
    tmp, _, _ = arch
    (tmp / "cli_arch_broken.py").write_text(RAISING_ARCH)
    args = [x if x != "cli_arch_models:student" else "cli_arch_broken:broken" for x in _args(tmp)]
    with pytest.raises(SystemExit, match=r"^distillx transfer: --student-arch 'cli_arch_broken:broken' raised "
                                         r"RuntimeError: the config file for this model is missing$"):
        cli(args)


@pytest.mark.parametrize("flag", ["--out", "--json"])
def test_an_output_path_that_is_a_directory(arch, flag):
    tmp, _, _ = arch
    (tmp / "outdir").mkdir()
    with pytest.raises(SystemExit, match=rf"^distillx transfer: {flag} '{tmp / 'outdir'}' is a directory; give the "
                                         "path of the file to write$"):
        cli(_args(tmp, flag, str(tmp / "outdir")))
    assert os.listdir(tmp / "outdir") == []


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "garbage", "random", "legacy-truncated"])
def test_a_damaged_checkpoint_does_not_suggest_allow_pickle(arch, damage):
    tmp, _, _ = arch
    path = tmp / "teacher.pt"
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
        expected = "is corrupt or truncated: its zip archive is truncated or damaged"
    elif damage == "zeroed":
        cut = bytearray(raw)
        cut[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
        path.write_bytes(cut)
        expected = "is corrupt or truncated: the data of '.*' fails its CRC-32 check"
    elif damage == "legacy-truncated":  # the pre-zip format of a whole model, cut in its pickle
        buffer = io.BytesIO()
        torch.save(nn.Linear(12, 5), buffer, _use_new_zipfile_serialization=False)
        path.write_bytes(buffer.getvalue()[:300])
        expected = r"is corrupt or truncated: it is not a torch.save file \(its pickles do not parse\)"
    else:
        path.write_bytes(b"this is not a checkpoint at all" if damage == "garbage" else bytes(range(256)) * 3)
        expected = r"is corrupt or truncated: it is not a torch.save file \(its pickles do not parse\)"
    for extra in ((), ("--allow-pickle",)):
        with pytest.raises(SystemExit, match=rf"--teacher '{path}' {expected}") as info:
            cli(_args(tmp, *extra))
        assert "--allow-pickle" not in str(info.value)


def _prune_args(tmp, *extra):
    return ["transfer", "prune", "--teacher", str(tmp / "teacher.pt"), "--student", str(tmp / "student.pt"),
            "--teacher-arch", "cli_arch_models:teacher", "--student-arch", "cli_arch_models:student", *extra]


def test_prune_with_calibration_from_a_file_or_a_builder(arch, capsys, monkeypatch):
    tmp, t, _ = arch
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(0))
    torch.save([(x, torch.zeros(32, dtype=torch.long))], tmp / "calib.pt")
    assert cli(_prune_args(tmp, "--calibration", str(tmp / "calib.pt"), "--json", str(tmp / "r.json"),
                           "--out", str(tmp / "init.pt"))) == 0
    report = json.loads((tmp / "r.json").read_text())
    (space, found), = report["importance"]["channels"].items()
    with torch.no_grad():
        score = torch.relu(t[0](x)).abs().mean(0)
    kept = sorted(sorted(range(64), key=lambda i: (-float(score[i]), i))[:16])
    assert found["kept channels"] == kept
    written = torch.load(tmp / "init.pt", weights_only=True)
    assert torch.equal(written["0.weight"], t[0].weight[kept].detach())
    # a builder of batches
    (tmp / "calib_builder.py").write_text("import torch\ndef batches():\n    return [torch.load(%r)]\n"
                                          % str(tmp / "calib.pt"))
    monkeypatch.syspath_prepend(str(tmp))
    assert cli(_prune_args(tmp, "--calibration", "calib_builder:batches")) == 0
    capsys.readouterr()


@pytest.mark.parametrize("spec, message", [
    ("missing.pt", "is neither a file nor MODULE:CALLABLE"),
    ("os:getcwd", "prune: calibration must be an iterable of batches"),
])
def test_bad_calibration_is_one_line(arch, capsys, spec, message):
    tmp, _, _ = arch
    try:
        code = cli(_prune_args(tmp, "--calibration", spec))
    except SystemExit as exc:
        code, err = 2, str(exc)
    else:
        err = capsys.readouterr().err
    assert code == 2 and message in err
