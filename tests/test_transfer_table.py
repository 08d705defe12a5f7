"""Fast check of ``python -m distillx.experiments.transfer_table`` with tiny settings."""
import json

import pytest
import torch

from distillx import demo
from distillx.experiments import transfer_table as tt

ARGS = ["--seeds", "0", "--epochs", "1", "--teacher-epochs", "10", "--inits", "random,select,head_fit",
        "--students", "64-32-10"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("tt") / "table.json"
    threads = torch.get_num_threads()
    assert tt.main(ARGS + ["--json", str(path)]) == 0
    assert torch.get_num_threads() == threads  # the single-thread setting is undone
    return json.loads(path.read_text())


def test_json_structure(result):
    assert result["seeds"] == [0] and result["epochs"] == 1 and result["teacher_epochs"] == 10
    assert result["dataset"]["train"] == 1347 and result["dataset"]["test"] == 450
    assert result["recipe"]["students"] == ["64-32-10"]
    rows = {(r["student"], r["init"], r["training"]): r for r in result["rows"]}
    assert set(rows) == {("64-32-10", i, t) for i in ("random", "select", "head_fit") for t in ("no kd", "kd")}
    for row in rows.values():
        for acc in row["acc_init"] + row["acc_after"]:
            assert 0.0 <= acc <= 1.0
        assert row["acc_init_stats"]["n"] == 1 and row["acc_init_stats"]["sd"] is None
        assert row["acc_after_stats"]["mean"] == row["acc_after"][0]
        assert row["vs_random"]["per_seed"] == [pytest.approx(row["acc_after"][0] -
                                                              rows["64-32-10", "random", row["training"]]
                                                              ["acc_after"][0])]
    # the init accuracy does not depend on the training that follows
    for init in ("random", "select", "head_fit"):
        assert rows["64-32-10", init, "no kd"]["acc_init"] == rows["64-32-10", init, "kd"]["acc_init"]
    runs = {r["init"]: r for r in result["runs"]}
    assert runs["random"]["transfer"] is None
    assert runs["head_fit"]["transfer"]["counts"]["fitted"] == 2
    assert 0.5 < result["teachers"][0]["test_accuracy"] <= 1.0


def test_head_fit_init_is_far_above_chance(result):
    rows = {(r["init"], r["training"]): r for r in result["rows"]}
    assert rows["head_fit", "no kd"]["acc_init"][0] > 0.5
    assert rows["random", "no kd"]["acc_init"][0] < 0.3  # an untrained student is near chance (0.1)


def test_random_rows_are_the_demo_students(result):
    """Same seed, split, teacher, initial student and batches as the demo: identical accuracies."""
    demo_result = demo.run(epochs=1, seed=0, teacher_epochs=10)
    acc = {r["model"]: r["test_accuracy"] for r in demo_result["rows"]}
    rows = {(r["init"], r["training"]): r for r in result["rows"]}
    assert result["teachers"][0]["test_accuracy"] == acc["teacher"]
    assert rows["random", "no kd"]["acc_after"][0] == acc["student (scratch)"]
    assert rows["random", "kd"]["acc_after"][0] == acc["student (kd)"]


def test_markdown_table_printed(result, capsys):
    text = tt.format_table(result)
    assert "| head_fit | kd |" in text and "Student 64-32-10" in text and "acc after 1 ep" in text


@pytest.mark.parametrize("args", [["--epochs", "0"], ["--inits", "random,nope"], ["--students", "64-32-9"],
                                  ["--seeds", "0,0"], ["--seeds", "x"]])
def test_rejects_bad_arguments(args):
    with pytest.raises(SystemExit) as exc:
        tt.main(args)
    assert exc.value.code == 2
