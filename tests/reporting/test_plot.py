"""plot_metrics: a readable PNG per log, phases optional, a clear error without matplotlib."""
import os
import struct
import subprocess
import sys

import pytest

from distillx.reporting import MetricsLog, plot_metrics
from distillx.reporting import plot as plot_module

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", head[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", head[16:24])


def check_png(path, size):
    assert png_size(path) == size
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG" and img.size == size


def make_log(phases=("teacher", "student"), epochs=4):
    log = MetricsLog()
    for phase in phases:
        for e in range(epochs):
            extra = {"kd": 0.3 / (e + 1), "at": 50.0 / (e + 1)} if phase == "student" else {}
            log.log_epoch(phase, e, loss=1.0 / (e + 1), task=0.5 / (e + 1), val_accuracy=0.5 + e / 20,
                          val_loss=0.8, lr=0.01, **extra)
    return log


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


def test_teacher_and_student(tmp_path, mpl):
    path = str(tmp_path / "metrics.png")
    assert plot_metrics(make_log(), path) == path
    check_png(path, (1200, 800))  # two phase columns of 6 in, 8 in tall, 100 dpi
    assert os.listdir(tmp_path) == ["metrics.png"]  # written atomically: no temp file left


def test_only_student_phase_from_a_dict(tmp_path, mpl):
    path = tmp_path / "student.png"
    log = make_log(phases=("student",))
    assert plot_metrics(log.to_dict(), path) == str(path)
    check_png(path, (600, 800))


def test_single_epoch_non_finite_and_missing_accuracy(tmp_path, mpl):
    log = MetricsLog()
    log.log_epoch("student", 0, loss=float("nan"), task=float("inf"), kd=0.1)
    log.log_epoch("teacher", 0, loss=0.7)
    path = tmp_path / "odd.png"
    plot_metrics(log, path, title="odd run", dpi=50)
    check_png(path, (600, 400))


def test_overwrites_an_existing_file(tmp_path, mpl):
    path = tmp_path / "metrics.png"
    path.write_bytes(b"old")
    plot_metrics(make_log(phases=("teacher",), epochs=2), path)
    check_png(path, (600, 800))


def test_phase_order_and_components():
    log = MetricsLog()
    log.log_epoch("student", 0, loss=1.0, kd=0.5, task=0.5, val_accuracy=0.4, lr=0.1, time=3.0, note="x")
    log.log_epoch("finetune", 0, loss=1.0)
    log.log_epoch("teacher", 0, loss=1.0)
    assert plot_module._ordered_phases(log) == ["teacher", "student", "finetune"]
    assert plot_module._components(log.epochs("student"), None) == ["loss", "task", "kd"]
    assert plot_module._components(log.epochs("student"), ["kd", "missing"]) == ["kd"]


def test_empty_log_and_bad_input(tmp_path, mpl):
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_metrics(MetricsLog(), tmp_path / "x.png")
    with pytest.raises(TypeError):
        plot_metrics([{"epoch": 0}], tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError) as info:
        plot_metrics(make_log(), tmp_path / "x.png")
    message = str(info.value)
    assert "pip install matplotlib" in message and "pip install distillx[plot]" in message
    assert os.listdir(tmp_path) == []


def test_importing_reporting_does_not_import_matplotlib():
    code = "import sys, distillx.reporting; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)
