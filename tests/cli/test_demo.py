"""Smoke test of ``distillx demo`` with tiny epoch counts (no timing assertions)."""
import json

import pytest
import torch

from distillx import cli, demo
from distillx.cli import demo as demo_cli


def test_demo_prints_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "demo.json"
    threads = torch.get_num_threads()
    assert demo_cli.main(["--epochs", "1", "--teacher-epochs", "1", "--seed", "3", "--json", str(path)]) == 0
    assert torch.get_num_threads() == threads  # the single-thread setting is undone
    out = capsys.readouterr().out
    for name in ("teacher", "student (scratch)", "student (kd)"):
        assert name in out
    assert "test acc" in out and "distilled vs scratch" in out

    result = json.loads(path.read_text())
    assert result["seed"] == 3 and result["epochs"] == 1
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"teacher", "student (scratch)", "student (kd)"}
    assert rows["student (scratch)"]["parameters"] == rows["student (kd)"]["parameters"]
    assert rows["teacher"]["parameters"] > 10 * rows["student (kd)"]["parameters"]
    for r in rows.values():
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["latency_ms"] > 0
    assert result["dataset"] == {"name": "digits", "train": 1347, "test": 450}


def test_demo_is_reproducible(capsys):
    first = demo.run(epochs=1, seed=0, teacher_epochs=1)
    second = demo.run(epochs=1, seed=0, teacher_epochs=1)
    accuracies = [[r["test_accuracy"] for r in res["rows"]] for res in (first, second)]
    assert accuracies[0] == accuracies[1]


def test_demo_through_cli(capsys):
    assert cli.main(["demo", "--epochs", "1", "--teacher-epochs", "1"]) == 0
    assert "student (kd)" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--epochs", "0"], ["--teacher-epochs", "-1"], ["--bogus"]])
def test_demo_rejects_bad_arguments(args):
    with pytest.raises(SystemExit) as exc:
        demo_cli.main(args)
    assert exc.value.code == 2


def test_demo_head_mode_prints_every_cut(tmp_path, capsys):
    path = tmp_path / "head.json"
    assert demo_cli.main(["--mode", "head", "--epochs", "2", "--teacher-epochs", "2", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())
    names = [row["model"] for row in result["rows"]]
    assert names == ["teacher (full)", "student (scratch)", "trunk to 1 + head", "trunk to 4 + head"]
    for row in result["rows"]:
        assert row["model"] in out and row["parameters"] > 0 and 0 <= row["test_accuracy"] <= 1
    # the deployed model: teacher layers up to the cut plus the head (64*256+256 + 256*32+32 + 32*10+10)
    assert result["rows"][2]["parameters"] == 64 * 256 + 256 + 256 * 32 + 32 + 32 * 10 + 10
