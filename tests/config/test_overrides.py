"""``--set KEY=VALUE``: value parsing, dotted paths with list indices, unknown paths."""
from __future__ import annotations

import json

import pytest

from distillx.config import ConfigError, load
from distillx.cli.run import main
from distillx.config.files import apply_override, parse_value


@pytest.mark.parametrize("text, value", [
    ("5", 5), ("1e-3", 1e-3), ("2.0", 2.0), ("true", True), ("false", False),
    ("[64, 128, 10]", [64, 128, 10]), ('{"std": 0.1}', {"std": 0.1}), ('"5"', "5"),
    ("'single'", "single"), ("{ std = 0.1 }", {"std": 0.1}), ("[1, 2,]", [1, 2]),  # TOML
    ("runs/x", "runs/x"), ("jsd", "jsd"), ("", ""), ("2024-01-01", "2024-01-01"),  # plain strings
])
def test_values_are_json_then_toml_then_strings(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_overrides_reach_every_kind_of_key():
    cfg = load("digits", ["student.epochs=5", "methods.0.T=4", "methods.0.divergence=jsd",
                          "teacher.optimizer.lr=1e-4", "teacher.options.widths=[64, 128, 10]",
                          "output_dir=runs/other", "training.progress=false", "data.options.batch_size=32"])
    assert cfg["student"]["epochs"] == 5
    assert cfg["methods"][0] == {"name": "kd", "T": 4, "weight": 1.0, "divergence": "jsd"}
    assert cfg["teacher"]["optimizer"]["lr"] == 1e-4
    assert cfg["teacher"]["options"]["widths"] == [64, 128, 10]
    assert cfg["output_dir"] == "runs/other"
    assert cfg["training"]["progress"] is False
    assert cfg["data"]["options"]["batch_size"] == 32


def test_overrides_create_tables_the_config_leaves_out():
    cfg = load("digits", ["transfer.name=select", "training.amp=bf16", "teacher.checkpoint=t.pt",
                          "weight_schedules.kd.start=0", "weight_schedules.kd.end=1", "weight_schedules.kd.epochs=3"])
    assert cfg["transfer"] == {"name": "select"}
    assert cfg["training"]["amp"] == "bf16" and cfg["training"]["cache_dtype"] == "float16"
    assert cfg["teacher"]["checkpoint"] == "t.pt"
    assert cfg["weight_schedules"] == {"kd": {"kind": "linear", "start": 0.0, "end": 1.0, "epochs": 3.0}}


def test_whole_arrays_can_be_replaced():
    cfg = load("digits", ['methods=[{"name": "kd", "T": 4.0}, {"name": "kd", "T": 1.0, "weight": 0.5}]'])
    assert [m["T"] for m in cfg["methods"]] == [4.0, 1.0]


def test_an_overridden_value_is_validated_with_its_path():
    with pytest.raises(ConfigError, match=r"student\.epochs: expected an integer >= 1, got 'five' \(string\)"):
        load("digits", ["student.epochs=five"])


@pytest.mark.parametrize("item, expected", [
    ("student.epochz=3", r"--set student\.epochz: unknown key 'student\.epochz' in \[student\] \(did you mean "
                         r"'epochs'\?\); valid keys there: builder, options, pretrained, config, epochs, optimizer, "
                         r"scheduler, task_weight"),
    ("bogus=1", r"--set bogus: unknown key 'bogus' in the top level; valid keys there: seed, output_dir, device"),
    ("training.foo=1", r"valid keys there: amp, grad_clip, cache_teacher, cache_dtype, cache_top_k, progress"),
    ("teacher.optimizer.momentun=0.9", r"valid keys there: name, lr, weight_decay, betas, momentum, nesterov"),
    ("methods.1.T=4", r"--set methods\.1\.T: methods has 1 item\(s\); index 1 is out of range"),
    ("methods.first.T=4", r"--set methods\.first\.T: methods is an array: index it with a number \(methods\.0\)"),
    ("seed.x=1", r"--set seed\.x: seed is an integer >= 0: it has no key 'x'"),
    ("augmentations.0.p=0.5", r"--set augmentations\.0\.p: the config has no augmentations array to index"),
    ("student.epochs", r"--set expects KEY=VALUE \(e\.g\. student\.epochs=5\), got 'student\.epochs'"),
    ("student..epochs=1", r"--set student\.\.epochs: empty key in the dotted path"),
])
def test_bad_override_paths_are_errors(item, expected):
    with pytest.raises(ConfigError, match=expected):
        load("digits", [item])


def test_free_form_options_take_any_key():
    raw = {"data": {"options": {}}}
    apply_override(raw, "data.options.anything.nested=1")
    assert raw == {"data": {"options": {"anything": {"nested": 1}}}}


def test_print_config_shows_the_overridden_resolved_config(capsys):
    assert main(["digits", "--set", "student.epochs=7", "--set", "methods.0.T=4.0", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == load("digits", ["student.epochs=7", "methods.0.T=4.0"])
    assert printed["student"]["epochs"] == 7


def test_cli_reports_override_errors_without_a_traceback(capsys):
    assert main(["digits", "--set", "methods.2.T=4", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distillx run: --set methods.2.T: methods has 1 item(s)")
    assert "Traceback" not in err
