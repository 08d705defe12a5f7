"""DDP under torchrun (gloo, CPU): 2 ranks with 32 samples each reach the weights of one process with
a global batch of 64 (within float tolerance); only rank 0 writes the checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from distillx.testing import child_env

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "ddp_script.py")


GLOO = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                          reason="torch.distributed with gloo is needed")


def single_and_two_ranks(tmp_path, *extra):
    single, multi = str(tmp_path / "single.pt"), str(tmp_path / "ddp.pt")
    subprocess.run([sys.executable, SCRIPT, single, "1", *extra], check=True, env=child_env(), timeout=300)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          SCRIPT, multi, "2", *extra], env=child_env(), timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return torch.load(single), torch.load(multi)


@GLOO
def test_two_ranks_match_one_process(tmp_path):
    a, b = single_and_two_ranks(tmp_path)
    assert b["world"] == 2 and a["world"] == 1
    for key in a["student"]:
        torch.testing.assert_close(b["student"][key], a["student"][key], rtol=1e-5, atol=1e-6, msg=key)
    for sa, sb in zip(a["adapters"], b["adapters"]):
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key], rtol=1e-5, atol=1e-6, msg=key)
    # epoch metrics are summed over ranks, so both runs report the same per-sample means
    for ha, hb in zip(a["history"], b["history"]):
        assert hb["loss"] == pytest.approx(ha["loss"], rel=1e-5)
    assert sorted(os.listdir(tmp_path / "ddp.pt.ckpt")) == ["checkpoint.pt"]
    # only rank 0 built the plugin's logger, and it saw every step of the 2 epochs (8 of 64 samples each)
    assert sorted(p for p in os.listdir(tmp_path) if ".logger." in p) == ["ddp.pt.logger.rank0",
                                                                         "single.pt.logger.rank0"]
    assert json.loads((tmp_path / "ddp.pt.logger.rank0").read_text()) == list(range(1, 17))


@GLOO
def test_balanced_loss_terms_use_the_same_factors_on_every_rank(tmp_path):
    """``balance="auto"``: a measuring step averages each term's gradient over the ranks, so both
    ranks hold the same factors, the single process's (within float tolerance), and the same weights."""
    a, b = single_and_two_ranks(tmp_path, "auto")
    ranks = [torch.load(str(tmp_path / f"ddp.pt.rank{r}")) for r in range(2)]
    assert ranks[0] == ranks[1] and ranks[0]["steps"] == 16
    assert len(b["factors"]) == len(a["factors"]) == 16
    for fa, fb in zip(a["factors"], b["factors"]):
        assert fb.keys() == fa.keys() == {"weight/task", "weight/kd", "weight/sld"}
        assert fb == pytest.approx(fa, abs=1e-5)
    assert len({(f["weight/task"], f["weight/sld"]) for f in a["factors"]}) > 2  # measured, not left at 1
    for key in a["student"]:
        torch.testing.assert_close(b["student"][key], a["student"][key], rtol=1e-5, atol=1e-6, msg=key)
