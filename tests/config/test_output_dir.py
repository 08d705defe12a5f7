"""``distillx run`` and what it may delete in ``output_dir``: ``--overwrite`` removes only the files a
previous run's ``distillx-outputs.json`` lists as distillx's own (never a file the new run reads as
input, never anything outside the output names), and only once the new run has loaded its inputs;
a teacher cache there is reused only for the same teacher, captures and data."""
from __future__ import annotations

import json

import torch

from distillx.cli.run import main
from distillx.config.outputs import MANIFEST
from distillx.teacher_cache import TeacherCache


def run(out, *extra, epochs=(0, 1)):
    argv = ["digits", "--quiet", "--set", f"output_dir={out}", "--set", f"teacher.epochs={epochs[0]}",
            "--set", f"student.epochs={epochs[1]}", *extra]
    return main(argv)


def listed(out):
    return json.loads((out / MANIFEST).read_text())["files"]


def test_overwrite_leaves_a_student_folder_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    (out / "student").mkdir(parents=True)
    (out / "student" / "README.txt").write_text("notes")
    assert run(out, "--overwrite") == 0
    assert (out / "student" / "README.txt").read_text() == "notes"
    assert sorted(listed(out)) == ["checkpoint.pt", "config.json", "metrics.json", "metrics.png", "student.pt"]


def test_overwrite_removes_what_the_previous_run_wrote_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    assert run(out, epochs=(1, 1)) == 0
    assert "teacher.pt" in listed(out)
    (out / "notes.txt").write_text("mine")
    assert run(out, "--overwrite") == 0  # no teacher training this time: the old teacher.pt goes
    assert not (out / "teacher.pt").exists() and (out / "notes.txt").read_text() == "mine"
    # without a manifest nothing is known to be distillx's: a file this run does not write stays
    (out / MANIFEST).unlink()
    (out / "teacher.pt").write_text("my own file with a distillx name")
    assert run(out, "--overwrite") == 0
    assert (out / "teacher.pt").read_text() == "my own file with a distillx name"


def test_overwrite_keeps_the_previous_output_this_run_loads(tmp_path):
    out = tmp_path / "out"
    assert run(out, epochs=(1, 1)) == 0
    saved = torch.load(out / "teacher.pt", weights_only=True)
    # the new run loads the previous run's teacher from output_dir: it must still be there to load
    assert run(out, "--overwrite", "--set", f"teacher.checkpoint={out / 'teacher.pt'}") == 0
    kept = torch.load(out / "teacher.pt", weights_only=True)
    assert all(torch.equal(saved[k], kept[k]) for k in saved)
    assert "teacher.pt" in listed(out)  # still distillx's own: a later --overwrite may remove it


def test_a_tampered_manifest_deletes_nothing_outside_the_outputs(tmp_path):
    out = tmp_path / "out"
    assert run(out) == 0
    (tmp_path / "outside.txt").write_text("x")
    (out / "notes.txt").write_text("x")
    (out / "student").mkdir()
    (out / "student" / "keep.txt").write_text("x")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"] += ["../outside.txt", "notes.txt", "student/../notes.txt", str(tmp_path / "outside.txt"), 3]
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert run(out, "--overwrite") == 0
    assert (tmp_path / "outside.txt").exists() and (out / "notes.txt").exists()
    assert (out / "student" / "keep.txt").exists()


def test_overwrite_with_other_data_rebuilds_the_teacher_cache(tmp_path):
    out = tmp_path / "out"
    cache = ["--set", "training.cache_teacher=true", "--set", "training.cache_dtype=float32"]
    assert run(out, *cache) == 0
    first = TeacherCache.open(out / "teacher_cache")
    built = (out / "teacher_cache" / "manifest.json").stat().st_mtime_ns
    assert run(out, "--overwrite", *cache) == 0  # the same teacher, captures and data: reused
    assert (out / "teacher_cache" / "manifest.json").stat().st_mtime_ns == built
    assert run(out, "--overwrite", *cache, "--set", "data.options.seed=1") == 0
    assert TeacherCache.open(out / "teacher_cache").manifest["inputs"] != first.manifest["inputs"]
