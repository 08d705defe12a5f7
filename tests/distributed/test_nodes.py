"""Two torchrun "nodes" on 127.0.0.1 (one process each, gloo, c10d rendezvous), as README's
several-node command runs them: both finish, with identical students."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from distillx.testing import child_env

from .test_sharding import HERE

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_finish_with_identical_students(tmp_path):
    out, port = str(tmp_path / "run"), free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=distillx-test", os.path.join(HERE, "shard_script.py"), out, "random"],
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    ranks = [torch.load(f"{out}.{r}", weights_only=True)["random"] for r in (0, 1)]
    assert ranks[0]["seen"] != ranks[1]["seen"]  # each node trained on its own shard
    for key, value in ranks[0]["student"].items():
        assert torch.equal(value, ranks[1]["student"][key]), key
