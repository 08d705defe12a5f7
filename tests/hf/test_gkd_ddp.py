"""``gkd`` under torchrun DDP (2 ranks, gloo, CPU): every rank samples its own completions from its own
generator (saved per rank in the checkpoint), and the ranks' students stay equal (gradients are
averaged over batches of different lengths)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from distillx.engine import checkpoint as ckpt
from distillx.testing import child_env

pytest.importorskip("transformers")
HERE = os.path.dirname(os.path.abspath(__file__))
GLOO = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                          reason="torch.distributed with gloo is needed")


@GLOO
def test_two_ranks_sample_their_own_completions_and_stay_in_step(tmp_path):
    out = str(tmp_path / "gkd")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(HERE, "gkd_ddp_script.py"), out], env=child_env(), timeout=300,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(f"{out}.rank{r}") for r in range(2)]
    assert ranks[0]["world"] == 2
    for key in ranks[0]["student"]:
        assert torch.equal(ranks[0]["student"][key], ranks[1]["student"][key]), key
    assert not torch.equal(ranks[0]["generator"], ranks[1]["generator"])  # each rank its own stream
    # epoch metrics are summed over both ranks: the on-policy share counts every rank's batches
    assert all(0.0 <= h["gkd/on_policy"] <= 1.0 for h in ranks[0]["history"])
    assert ranks[0]["history"] == ranks[1]["history"]
    saved = ckpt.load(os.path.join(out + ".ckpt", ckpt.FILENAME))
    rng = saved["position"]["step_rng"]["ranks"]
    assert len(rng) == 2
    assert [torch.equal(r["extra"][-1], ranks[i]["generator"]) for i, r in enumerate(rng)] == [True, True]
