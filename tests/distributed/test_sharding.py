"""Every loader form sharded over 2 ranks (torchrun, gloo): each sample once per epoch across ranks,
the shuffle differs between epochs, and both ranks end with identical student weights."""
from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from distillx.engine.distributed import DistContext
from distillx.engine.sharding import ShardedSampler, shard_loader
from distillx.testing import child_env

HERE = os.path.dirname(os.path.abspath(__file__))
FORMS = ["random", "global_random", "sequential", "custom", "batch_sampler", "batch_sampler_as_sampler", "mapping"]
N, EPOCHS = 45, 3

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """One torchrun launch (2 ranks) for every form: what each rank saw and its student."""
    out = str(tmp_path_factory.mktemp("shard") / "run")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(HERE, "shard_script.py"), out, *FORMS], env=child_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("form", FORMS)
def test_every_loader_form_is_sharded(form, sharded):
    ranks = [sharded[0][form], sharded[1][form]]
    for epoch in range(EPOCHS):
        batches = [ranks[0]["seen"][epoch], ranks[1]["seen"][epoch]]
        assert len(batches[0]) == len(batches[1]), (form, epoch)  # the same number of steps on every rank
        a, b = ([i for batch in per_rank for i in batch] for per_rank in batches)
        assert sorted(set(a) | set(b)) == list(range(N)), (form, epoch)  # every sample, on some rank
        assert len(a) + len(b) - N <= 4, (form, epoch)  # repeated only to pad the last step: less than a batch
        assert {len(batch) for batch in batches[0][:-1]} == {4}  # the per-rank batch size is kept
    if form != "sequential":
        assert ranks[0]["seen"][0] != ranks[0]["seen"][1]  # a new shuffle every epoch
    for model in ("student", "head"):  # a plain student, and one on the teacher's features (student_input)
        for key, value in ranks[0][model].items():
            assert torch.equal(value, ranks[1][model][key]), (model, key)


def test_one_process_is_untouched_and_bad_loaders_are_refused():
    from torch.utils.data import DataLoader, IterableDataset

    loader = DataLoader(list(range(10)), batch_size=2)
    assert shard_loader(loader, DistContext()) is loader
    two = DistContext(rank=1, world_size=2)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(4))

    with pytest.raises(TypeError, match="IterableDataset Stream"):
        shard_loader(DataLoader(Stream()), two)
    with pytest.raises(TypeError, match="needs a torch.utils.data.DataLoader to shard, got list"):
        shard_loader([(1, 2)], two)

    class Shuffler(torch.utils.data.Sampler):  # its order comes from random.Random: ranks would disagree
        def __init__(self, n):
            self.n, self.rng = n, random.Random(0)

        def __len__(self):
            return self.n

        def __iter__(self):
            return iter(self.rng.sample(range(self.n), self.n))

    with pytest.raises(TypeError, match="sampler Shuffler draws random numbers distillx cannot make equal"):
        shard_loader(DataLoader(list(range(10)), batch_size=2, sampler=Shuffler(10)), two)


def test_sharded_sampler_pads_and_drops():
    assert list(ShardedSampler(range(5), 0, 2)) == [0, 2, 4] and list(ShardedSampler(range(5), 1, 2)) == [1, 3, 0]
    assert list(ShardedSampler(range(5), 1, 2, drop_last=True)) == [1, 3] and len(ShardedSampler(range(5), 0, 2, True)) == 2
