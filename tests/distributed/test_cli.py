"""``torchrun --nproc_per_node=2 -m distillx.cli run digits``: only rank 0 writes and prints, the
accuracy stays within a point of one process with the same global batch, and a failure on one rank
stops every rank with that rank named."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch

from distillx.testing import child_env

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")
SHORT = ["--set", "teacher.epochs=20", "--set", "student.epochs=60"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distillx.cli"]


def accuracy(stdout: str, who: str) -> float:
    return float(re.search(rf"{who}\s+[\d,]+ params\s+val accuracy ([\d.]+)%", stdout).group(1))


def test_digits_under_torchrun_matches_one_process(tmp_path):
    one = subprocess.run([sys.executable, "-m", "distillx.cli", "run", "digits", "--set", f"output_dir={tmp_path / 'one'}",
                          *SHORT], env=child_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([*TORCHRUN, "run", "digits", "--set", f"output_dir={tmp_path / 'two'}", *SHORT,
                          "--set", "data.options.batch_size=32"],  # 2 ranks x 32: the global batch of one process
                         env=child_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("distillx run: bundled config") == 1  # rank 0 printed, rank 1 stayed quiet
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert abs(accuracy(two.stdout, "student") - accuracy(one.stdout, "student")) <= 1.0, (one.stdout, two.stdout)


def test_a_failure_on_one_rank_stops_every_rank_naming_it(tmp_path):
    (tmp_path / "flaky_data.py").write_text(textwrap.dedent("""
        import os
        from distillx.config.data import digits

        def data(**options):
            if os.environ.get("RANK") == "1":
                raise RuntimeError("the data of rank 1 is missing")
            return digits(**options)
        """))
    done = subprocess.run([*TORCHRUN, "run", "digits", "--set", f"output_dir={tmp_path / 'run'}",
                           "--set", "data.builder=flaky_data:data", *SHORT],
                          env=dict(child_env(), PYTHONPATH=f"{tmp_path}:{child_env()['PYTHONPATH']}"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0  # torchrun stopped rank 0 too
    assert "distillx run (rank 1 of 2): training failed: RuntimeError: the data of rank 1 is missing" in done.stderr, \
        done.stderr[-3000:]
    assert not (tmp_path / "run" / "student.pt").exists()
