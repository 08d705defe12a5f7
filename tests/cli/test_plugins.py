"""`distillx plugins`: text and JSON listings, failures, exit status."""
from __future__ import annotations

import json
import re

from distillx.cli import plugins as plugins_cli

from tests.plugin import fakes


def test_lists_kd_with_its_provider(capsys):
    assert plugins_cli.main([]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^methods:\n(  .*\n)*  kd\s+distillx\.methods \(built-in\)$", out, re.M), out
    assert re.search(r"^plugins:\n  distillx\.methods\s+built-in$", out, re.M), out
    for section in ("weight transfers:", "kernels:", "augmentations:"):
        assert section in out
    assert "failed to load" not in out


def test_json(capsys):
    assert plugins_cli.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    kd = next(m for m in report["methods"] if m["name"] == "kd")
    assert kd["provider"] == "distillx.methods" and kd["source"] == "builtin"
    assert kd["object"] == "distillx.methods.kd.KD" and kd["overrides"] is None
    assert set(report) == {"plugins", "methods", "transfers", "kernels", "augmentations", "loggers", "failed",
                           "disabled"}
    assert [(e["name"], e["provider"]) for e in report["loggers"]] == [("tensorboard", "distillx.loggers")]
    assert report["failed"] == []


def test_entry_point_plugins_show_distribution_and_failures(install_fake, capsys, recwarn):
    install_fake("fake-good", "1.2.3", {"good": "fake_good_mod"}, {"fake_good_mod": fakes.GOOD})
    install_fake("fake-broken", "0.1", {"broken": "fake_broken_mod"}, {"fake_broken_mod": fakes.IMPORT_ERROR})
    assert plugins_cli.main([]) == 1  # a failed plugin makes the listing fail, for CI
    out = capsys.readouterr().out
    assert re.search(r"^  fake_mse\s+good \(fake-good 1\.2\.3\)$", out, re.M), out
    assert re.search(r"^  fake_kernel\s+good \(fake-good 1\.2\.3\)$", out, re.M), out
    assert re.search(r"^  good\s+fake-good 1\.2\.3  \[fake_good_mod\]$", out, re.M), out
    assert re.search(r"^failed to load:\n  broken \(fake-broken 0\.1\): import: ModuleNotFoundError", out, re.M), out


def test_a_plugin_running_argparse_at_import_does_not_end_the_command(install_fake, capsys, recwarn):
    install_fake("fake-good", "1.2.3", {"good": "fake_good_mod"}, {"fake_good_mod": fakes.GOOD})
    install_fake("fake-argparse", "0.4", {"argy": "fake_argparse_mod"}, {"fake_argparse_mod": fakes.ARGPARSE_AT_IMPORT})
    assert plugins_cli.main([]) == 1  # the listing, with the failure, not argparse's exit 2
    captured = capsys.readouterr()
    assert re.search(r"^  fake_mse\s+good \(fake-good 1\.2\.3\)$", captured.out, re.M), captured.out
    assert re.search(r"^failed to load:\n  argy \(fake-argparse 0\.4\): import: SystemExit: 2$", captured.out,
                     re.M), captured.out


def test_overrides_and_disabled_are_shown(install_fake, monkeypatch, capsys):
    install_fake("fake-over", "1.0", {"over": "fake_over_mod"}, {"fake_over_mod": fakes.OVERRIDE_KD})
    install_fake("fake-good", "1.2.3", {"good": "fake_good_mod"}, {"fake_good_mod": fakes.GOOD})
    monkeypatch.setenv("DISTILLX_DISABLE_PLUGINS", "good")
    assert plugins_cli.main([]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  kd\s+over \(fake-over 1\.0\), overrides distillx\.methods$", out, re.M), out
    assert "disabled by DISTILLX_DISABLE_PLUGINS: good" in out


def test_cli_dispatches_to_plugins(capsys):
    from distillx import cli

    assert cli.main(["plugins", "--json"]) == 0
    assert any(m["name"] == "kd" for m in json.loads(capsys.readouterr().out)["methods"])
