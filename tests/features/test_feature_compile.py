"""Capture through torch.compile (dynamo traces the hooks; the cheap 'eager' backend suffices)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distillx.features import FeatureExtractor, FeatureSpec, MissingFeatureError

from .models import TORCH_JIT_DEPRECATION, all_hooks


@TORCH_JIT_DEPRECATION
def test_capture_through_torch_compile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(5, 4)
    specs = {"h": "0", "in": "_orig_mod.2@input", "norm": FeatureSpec("0", reduction="l2_normalize")}
    hidden = model[0](x)
    with FeatureExtractor(compiled, specs) as ex:  # attached before the first compiled call
        y = compiled(x)
        feats = ex.collect()
    torch.testing.assert_close(y, model(x))
    torch.testing.assert_close(feats["h"], hidden)
    torch.testing.assert_close(feats["in"], torch.relu(hidden))
    torch.testing.assert_close(feats["norm"], nn.functional.normalize(hidden, dim=1))
    assert all_hooks(compiled) == 0
    ex.clear()
    compiled(x)  # hook removal is seen by the compiled code: nothing is captured any more
    assert ex.features == {}
    # Hooks added after the compiled model ran without hooks are invisible to its compiled code
    # (dynamo skips guards on empty hook dicts): the extractor reports the feature as missing.
    with FeatureExtractor(compiled, {"h": "0"}) as ex2:
        compiled(x)
        with pytest.raises(MissingFeatureError, match="torch.compile'd model ran before the hooks were attached"):
            ex2.collect()
