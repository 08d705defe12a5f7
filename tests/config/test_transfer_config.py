"""``[transfer]`` in run configs with calibration data: ``calibration = "train"`` is the run's own
training set read in order (the training order is untouched); bad values name the key."""
from __future__ import annotations

import json

import torch

from distillx.cli.run import main
from distillx.config.build import calibration_loader
from distillx.config.data import digits


def run(out, *extra):
    return main(["digits", "--quiet", "--set", f"output_dir={out}", "--set", "teacher.epochs=1",
                 "--set", "student.epochs=1", "--set", "student.options.widths=[64, 128, 128, 10]", *extra])


def test_prune_with_the_run_s_training_data(tmp_path, capsys):
    assert run(tmp_path / "a", "--set", 'transfer={"name": "prune", "calibration": "train", "max_batches": 4}') == 0
    capsys.readouterr()
    saved = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    report = saved["transfer_report"]
    assert report["strategy"] == "prune" and report["importance"]["channels"]
    assert report["counts"]["skipped"] == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["transfer"]["calibration"] == "train"


def test_calibration_reads_in_order_without_the_training_generator():
    train = digits()["train"]
    state = torch.get_rng_state()
    calib = calibration_loader(train)
    first = next(iter(calib))[0]
    assert torch.equal(first, train.dataset[0:first.shape[0]][0])
    assert torch.equal(torch.get_rng_state(), state)


def test_a_bad_calibration_names_the_key(tmp_path, capsys):
    assert run(tmp_path / "b", "--set", 'transfer={"name": "prune", "calibration": "test"}') == 2
    assert 'transfer.calibration: expected "train" or "val"' in capsys.readouterr().err
