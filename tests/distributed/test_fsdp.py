"""strategy="fsdp" (FSDP2 over 2 gloo ranks): the loss trajectory of DDP, exact resume from a
distributed checkpoint, and that checkpoint loaded back into one process; exact resume under DDP."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from distillx.testing import child_env

from .test_sharding import HERE

SCRIPT = os.path.join(HERE, "fsdp_script.py")
pytestmark = [pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="torch.distributed with gloo is needed"),
              pytest.mark.filterwarnings("ignore")]


def launch(strategy, out, interrupt_at=0, resume=False, ranks=2):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1
           else [sys.executable])
    done = subprocess.run(cmd + [SCRIPT, strategy, str(out), str(interrupt_at), "resume" if resume else "fresh"],
                          env=dict(child_env(), PYTHONWARNINGS="ignore"), capture_output=True, text=True, timeout=300)
    err = done.stderr if len(done.stderr) <= 6000 else done.stderr[:3000] + "\n[...]\n" + done.stderr[-3000:]
    assert done.returncode == 0, err  # the head holds a crashed rank's own stack (PYTHONFAULTHANDLER)
    return torch.load(out, weights_only=True)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    ddp, fsdp = launch("ddp", tmp / "ddp"), launch("fsdp", tmp / "fsdp")
    launch("fsdp", tmp / "cut", interrupt_at=6)  # SIGINT on rank 0 at its 6th step: every rank stops there
    ckpt = tmp / "cut.ckpt"
    shards = sorted(p.name for p in ckpt.iterdir())
    resumed = launch("fsdp", tmp / "cut", resume=True)
    launch("fsdp", tmp / "one", interrupt_at=6)
    single = launch("fsdp", tmp / "one", resume=True, ranks=1)
    launch("ddp", tmp / "ddp_cut", interrupt_at=6)
    ddp_resumed = launch("ddp", tmp / "ddp_cut", resume=True)
    return {"ddp": ddp, "fsdp": fsdp, "resumed": resumed, "shards": shards, "single": single,
            "ddp_resumed": ddp_resumed}


def test_ddp_resume_is_exact(runs):
    # every rank's random state and running sums are in the checkpoint, so all ranks continue exactly
    assert same(runs["ddp_resumed"]["student"], runs["ddp"]["student"])
    assert runs["ddp_resumed"]["history"] == runs["ddp"]["history"]


def test_fsdp_follows_the_ddp_loss_trajectory(runs):
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert len(ddp["steps"]) == len(fsdp["steps"]) == 12
    assert max(abs(a - b) for a, b in zip(ddp["steps"], fsdp["steps"])) < 1e-5
    assert all(torch.allclose(ddp["student"][k], fsdp["student"][k], atol=1e-5) for k in ddp["student"])


def test_fsdp_resume_from_the_distributed_checkpoint_is_exact(runs):
    assert runs["shards"] == ["checkpoint.dcp.student-1-2", "checkpoint.pt"]  # one complete shard set, named
    assert same(runs["resumed"]["student"], runs["fsdp"]["student"])
    assert runs["resumed"]["history"] == runs["fsdp"]["history"]


def test_a_checkpoint_of_two_ranks_resumes_in_one_process(runs):
    single = runs["single"]
    assert len(single["history"]) == 3  # finished the run it continued
    assert single["history"][0] == runs["fsdp"]["history"][0]  # the epoch before the checkpoint: restored


def test_strategy_arguments_are_checked():
    import distillx as dx
    from torch import nn

    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    with pytest.raises(ValueError, match="strategy must be one of 'ddp', 'fsdp'"):
        dx.Distiller(teacher, student, strategy="zero3")
    with pytest.raises(ValueError, match="shard_teacher=True shards the teacher with FSDP2: it needs strategy='fsdp'"):
        dx.Distiller(teacher, student, shard_teacher=True)
    with pytest.raises(ValueError, match="the optimizer must be built afterwards"):
        dx.Distiller(teacher, student, strategy="fsdp", optimizer=torch.optim.SGD(student.parameters(), lr=0.1))
