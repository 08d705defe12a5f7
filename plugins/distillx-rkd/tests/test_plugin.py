"""Discovery: ``rkd`` reaches distillx only through the ``distillx`` entry point of this distribution."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import distillx
from distillx.cli import main as cli_main
from distillx.plugin import get_plugin_manager, get_registries
from distillx.testing import assert_discovered
from distillx_rkd import RKD


def test_discovered_through_entry_point():
    assert_discovered("methods", "rkd", RKD, entry_point="rkd", target="distillx_rkd", distribution="distillx-rkd",
                      version="0.1.0")
    m = distillx.method("rkd", angle_weight=0.0)
    assert isinstance(m, RKD) and m.angle_weight == 0.0


def test_disabled_by_name(monkeypatch):
    monkeypatch.setenv("DISTILLX_DISABLE_PLUGINS", "rkd")
    assert "rkd" not in get_registries().methods
    assert "rkd" in get_plugin_manager().disabled
    assert "kd" in get_registries().methods


def test_listed_by_distillx_plugins_json(capsys):
    assert cli_main(["plugins", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    entry = next(e for e in report["methods"] if e["name"] == "rkd")
    assert entry["provider"] == "rkd" and entry["source"] == "entrypoint"
    assert entry["distribution"] == "distillx-rkd" and entry["object"] == "distillx_rkd.method.RKD"
    assert not report["failed"]


def test_fresh_process_import_loads_no_plugin_then_cli_finds_it():
    # A new interpreter: `import distillx` must not import the plugin; `distillx plugins` must find it.
    code = ("import sys, distillx; assert 'distillx_rkd' not in sys.modules, 'imported at import distillx'; "
            "from distillx.cli import main; sys.exit(main(['plugins', '--json']))")
    root = str(Path(distillx.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.pop("DISTILLX_DISABLE_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    providers = {e["name"]: e["provider"] for e in json.loads(proc.stdout)["methods"]}
    assert providers["rkd"] == "rkd"
