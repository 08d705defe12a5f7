"""Dotted paths: nesting, indices, wrappers, and the errors for paths that do not exist."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from distillx.features import FeatureExtractor, FeaturePathError, resolve_module, unwrap_model
from distillx.testing import child_env

from .models import TORCH_JIT_DEPRECATION, ConvNet, FakeDDP, TinyBert, mlp


@pytest.fixture
def bert():
    torch.manual_seed(0)
    return TinyBert(d=8, n=3)


def test_dotted_path_captures_that_modules_output(bert):
    x = torch.randn(2, 4, 8)
    with FeatureExtractor(bert, ["encoder.layer.1.attention.self:0", "encoder.layer.1@input"]) as ex:
        bert(x)
    layer1_in = ex["encoder.layer.1@input"]
    # recompute the hooked module by hand from its captured input
    expected_ctx, _ = bert.encoder.layer[1].attention.self(layer1_in)
    torch.testing.assert_close(ex["encoder.layer.1.attention.self:0"], expected_ctx)
    # and the captured input really is layer 0's output
    torch.testing.assert_close(layer1_in, bert.encoder.layer[0](x))


def test_negative_and_positive_indices_resolve_to_the_same_module(bert):
    assert resolve_module(bert, "encoder.layer.-1")[0] is bert.encoder.layer[2]
    assert resolve_module(bert, "encoder.layer.-3.output") == (bert.encoder.layer[0].output, "encoder.layer.0.output")
    x = torch.randn(2, 4, 8)
    with FeatureExtractor(bert, ["encoder.layer.-1", "encoder.layer.2"]) as ex:
        out = bert(x)
    assert ex.paths == {"encoder.layer.-1": "encoder.layer.2", "encoder.layer.2": "encoder.layer.2"}
    torch.testing.assert_close(ex["encoder.layer.-1"], out["hidden"])
    assert ex["encoder.layer.-1"] is ex["encoder.layer.2"]


def test_nested_sequential_and_named_sequential_indexed_by_position():
    net = ConvNet()
    assert resolve_module(net, "layer1.1.0") == (net.layer1[1][0], "layer1.1.0")
    # a Sequential built from an OrderedDict is indexed by position, reported by name
    assert resolve_module(net, "layer2.0") == (net.layer2.conv, "layer2.conv")
    assert resolve_module(net, "layer2.-1") == (net.layer2.act, "layer2.act")
    x = torch.randn(2, 3, 8, 8)
    with FeatureExtractor(net, ["layer1.1.0", "layer2.-1"]) as ex:
        net(x)
    torch.testing.assert_close(ex["layer1.1.0"], net.layer1[1][0](net.layer1[0](net.stem(x))))
    assert ex["layer2.-1"].shape == (2, 8, 4, 4) and (ex["layer2.-1"] >= 0).all()


def test_indexing_a_root_sequential():
    model = mlp()
    assert resolve_module(model, "-1") == (model[4], "4")
    assert resolve_module(model, "") == (model, "")


@pytest.mark.parametrize("wrap", [nn.DataParallel, FakeDDP], ids=["DataParallel", "fake_DDP"])
def test_wrappers_resolve_with_or_without_module_prefix(wrap):
    torch.manual_seed(0)
    net = mlp()
    wrapped = wrap(net)
    assert unwrap_model(wrapped) is net
    assert resolve_module(wrapped, "2") == resolve_module(wrapped, "module.2") == (net[2], "2")
    x = torch.randn(4, 6)
    with FeatureExtractor(wrapped, ["module.0", "2@input", "-1"]) as ex:
        y = wrapped(x)
    torch.testing.assert_close(ex["module.0"], net[0](x))
    torch.testing.assert_close(ex["2@input"], torch.relu(net[0](x)))
    torch.testing.assert_close(ex["-1"], y)


@TORCH_JIT_DEPRECATION
def test_nested_wrappers_and_compiled_module_paths():
    net = mlp()
    wrapped = FakeDDP(torch.compile(net))  # not called: only path resolution is exercised
    for path in ("4", "module.4", "module._orig_mod.4", "_orig_mod.4"):
        assert resolve_module(wrapped, path) == (net[4], "4"), path


REAL_DDP = """
import tempfile, torch, torch.distributed as dist
from torch import nn
from distillx.features import FeatureExtractor
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
with tempfile.TemporaryDirectory() as d:
    dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
    ddp = nn.parallel.DistributedDataParallel(net)
    x = torch.randn(3, 6)
    with FeatureExtractor(ddp, ["module.2", "2"]) as ex:
        ddp(x).sum().backward()
    torch.testing.assert_close(ex["module.2"], net[2](torch.relu(net[0](x))))
    assert ex["2"] is ex["module.2"]
    assert ex["2"].grad_fn is not None  # a student-side capture keeps its graph
    del ddp, ex
    dist.destroy_process_group()
print("ok")
"""


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is needed")
def test_real_ddp_single_process():
    """Paths through a real DistributedDataParallel wrapper (gloo, world size 1). In a fresh process:
    in the suite's process, Python objects earlier tests left in PyTorch's thread-local state were
    captured by gloo's allreduce work, and its worker thread then waited for the GIL while the main
    thread, holding it, joined that worker in ProcessGroupGloo's destructor (a hang seen once in CI)."""
    done = subprocess.run([sys.executable, "-c", REAL_DDP], env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_unknown_path_lists_closest_paths_and_names_the_side(bert):
    with pytest.raises(FeaturePathError) as e:
        FeatureExtractor(bert, ["encoder.layer.1.atention.self"], name="teacher")
    msg = str(e.value)
    assert msg.startswith("teacher model: no module at path 'encoder.layer.1.atention.self'")
    assert "'encoder.layer.1' (Layer) has no submodule 'atention'; its submodules: attention, output" in msg
    closest = msg.split("closest existing paths: ")[1].split(", ")
    assert closest[0] == "encoder.layer.1.attention.self"
    assert isinstance(e.value, LookupError) and isinstance(e.value, ValueError)


def test_unknown_top_level_name_without_side(bert):
    with pytest.raises(FeaturePathError, match=r"^model: no module at path 'clasifier': the model \(TinyBert\) "
                                               r"has no submodule 'clasifier'; its submodules: encoder, classifier"
                                               r"\n  closest existing paths: classifier"):
        resolve_module(bert, "clasifier")


def test_out_of_range_index_gives_the_valid_range(bert):
    with pytest.raises(FeaturePathError, match=r"index 3 is out of range for 'encoder.layer' \(ModuleList of "
                                               r"length 3; valid indices 0..2 or -3..-1\)"):
        FeatureExtractor(bert, ["encoder.layer.3.output"], name="student")
    with pytest.raises(FeaturePathError, match=r"^student model: .*index -4 is out of range"):
        FeatureExtractor(bert, ["encoder.layer.-4"], name="student")


def test_parameter_path_says_to_hook_the_module(bert):
    with pytest.raises(FeaturePathError, match=r"'weight' is a parameter of 'classifier', not a module"):
        resolve_module(bert, "classifier.weight")
