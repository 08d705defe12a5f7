"""Ranks that do not run the same configuration stop before training, every one of them, with an
error naming the ranks and the keys that differ (engine/distributed.check_same). Before, such ranks
hung in the first collective that differed (a DDP rank and an FSDP rank), or ran on out of step."""
from __future__ import annotations

import os
import textwrap
import threading

import pytest
import torch

from distillx.engine.distributed import RanksDisagree, check_same
from distillx.testing import child_env

from .processes import TORCHRUN, run

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ranks_script.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

# `distillx run` with extra arguments on rank 1 only, from $RANK1_ARGS: what a node with another
# config file, or a per-rank launcher script, produces.
LAUNCHER = textwrap.dedent("""
    import os, shlex, sys
    from distillx.cli import main

    extra = shlex.split(os.environ["RANK1_ARGS"]) if os.environ.get("RANK") == "1" else []
    sys.exit(main(sys.argv[1:] + extra))
    """)


@pytest.mark.parametrize("rank1, difference", [
    ("--set training.strategy=fsdp", 'training.strategy: "ddp" on rank 0, "fsdp" on rank 1'),
    ("--set student.epochs=3", "student.epochs: 2 on rank 0, 3 on rank 1"),
])
def test_distillx_run_stops_every_rank_naming_the_config_keys_that_differ(tmp_path, rank1, difference):
    (tmp_path / "launch.py").write_text(LAUNCHER)
    out = tmp_path / "run"
    code, output = run([*TORCHRUN, str(tmp_path / "launch.py"), "run", "digits", "--set", f"output_dir={out}",
                        "--set", "teacher.epochs=1", "--set", "student.epochs=2"], child_env(RANK1_ARGS=rank1))
    assert code != 0, output[-3000:]
    for rank in (0, 1):  # every rank says why it stopped
        assert (f"distillx run (rank {rank} of 2): the ranks disagree on the run's config, so every rank stops "
                f"before training: rank 1 differs from rank 0 in {difference}.") in output, output[-3000:]
    assert not out.exists()  # stopped before rank 0 even looked at output_dir


def test_distiller_fit_stops_every_rank_when_their_strategies_differ():
    code, output = run([*TORCHRUN, SCRIPT, "disagree"], child_env(RANK1_STRATEGY="fsdp"))
    assert code == 0, output[-3000:]
    assert output.count('REFUSED the ranks disagree on Distiller.fit()\'s settings and arguments, so every rank stops '
                        'before training: rank 1 differs from rank 0 in strategy: "ddp" on rank 0, "fsdp" on rank 1.') \
        == 2, output[-3000:]
    assert "TRAINED" not in output


def test_distiller_fit_trains_when_the_ranks_agree():
    code, output = run([*TORCHRUN, SCRIPT, "disagree"], child_env(RANK1_STRATEGY="ddp"))
    assert code == 0, output[-3000:]
    assert output.count("TRAINED") == 2 and "REFUSED" not in output, output[-3000:]


class ThreadRanks:
    """``world`` ranks played by threads: each gets a context whose ``gather`` meets the others at a
    barrier (its timeout is a hang guard)."""

    def __init__(self, world: int):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world, timeout=60)

    def check(self, descriptions: list) -> list:
        """What :func:`check_same` raised on each rank (None where it returned)."""
        raised = [None] * self.world

        def rank(r):
            group = self

            class Ctx:
                enabled, world_size = True, group.world

                def gather(self, obj):
                    group.slots[r] = obj
                    group.barrier.wait()
                    out = list(group.slots)
                    group.barrier.wait()
                    return out

            Ctx.rank = r
            try:
                check_same(Ctx(), descriptions[r], "the test's settings")
            except RanksDisagree as exc:
                raised[r] = str(exc)

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return raised


def test_check_same_names_each_rank_that_differs_and_its_keys_on_every_rank():
    base = {"strategy": "ddp", "epochs": 2, "methods": [{"name": "kd", "T": 2.0}], "loss": len}
    assert ThreadRanks(3).check([dict(base) for _ in range(3)]) == [None, None, None]  # the same: no error
    many = {**base, "methods": [{"name": "kd", "T": 4.0}], **{f"k{i}": i for i in range(7)}}
    raised = ThreadRanks(3).check([base, dict(base), many])
    assert raised[0] == raised[1] == raised[2]  # every rank stops, with the same message
    message = raised[0]
    assert message.startswith("the ranks disagree on the test's settings, so every rank stops before training: rank 2 "
                              'differs from rank 0 in k0: (unset) on rank 0, 0 on rank 2; k1: ')
    assert "methods.0.T: 2.0 on rank 0, 4.0 on rank 2" not in message and "and 2 more key(s)" in message  # 6 shown
    assert "rank 1 differs" not in message
    # functions are compared by name, never by a repr holding a memory address
    assert ThreadRanks(2).check([{"f": lambda x: x}, {"f": lambda x: x}]) == [None, None]
