"""The example plugin package in plugins/distillx-example, when it is installed (CI installs it)."""
from __future__ import annotations

import pytest

import distillx
from distillx.cli import plugins as plugins_cli
from distillx.plugin import get_plugin_manager, get_registries

distillx_example = pytest.importorskip("distillx_example")


def test_example_plugin_is_discovered_through_its_entry_point(capsys):
    methods = get_registries().methods
    assert methods.get("cosine_logits") is distillx_example.CosineLogits
    assert methods.provider("cosine_logits") == "example"
    info = get_plugin_manager().plugin_info["example"]
    assert (info.source, info.distribution) == ("entrypoint", "distillx-example-plugin")
    assert isinstance(distillx.method("cosine_logits", center=True), distillx_example.CosineLogits)
    plugins_cli.main([])
    assert "example (distillx-example-plugin 0.1.0)" in capsys.readouterr().out
