"""Config validation: the resolved config, and the error for each kind of mistake (unknown key at
every level, wrong type, missing required key), each naming the dotted key path."""
from __future__ import annotations

import copy
import json
import re
import sys
import types

import pytest

import distillx.config as dxc
from distillx.config import ConfigError, load, validate
from distillx.config import files as run_mod
from distillx.config.files import parse_value
from distillx.config import schema


def minimal() -> dict:
    return {"output_dir": "out",
            "data": {"builder": "distillx.config.data:digits"},
            "teacher": {"builder": "distillx.demo:mlp", "options": {"widths": [64, 16, 10]}},
            "student": {"builder": "distillx.demo:mlp", "options": {"widths": [64, 8, 10]}, "epochs": 2},
            "methods": [{"name": "kd", "T": 2.0}]}


def problems(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(raw)
    return info.value.problems


def with_value(path: str, value) -> dict:
    raw = minimal()
    node = raw
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = value
    return raw


# -- resolved config ---------------------------------------------------------------------------
def test_bundled_toml_and_json_give_the_same_resolved_config(tmp_path):
    toml_cfg, json_cfg = load("digits"), load("digits.json")
    assert toml_cfg == json_cfg
    assert json.dumps(toml_cfg, sort_keys=True) == json.dumps(json_cfg, sort_keys=True)  # 1e-3 vs 0.001, 2 vs 2.0
    # from files too, and a resolved config is itself a valid config that resolves to itself
    path = tmp_path / "resolved.json"
    path.write_text(json.dumps(toml_cfg))
    assert load(str(path)) == toml_cfg
    assert validate(copy.deepcopy(toml_cfg)) == toml_cfg


def test_the_bundled_config_is_the_demo_recipe():
    from distillx import demo

    cfg = load("digits")
    assert cfg["teacher"]["options"] == {"widths": list(demo.TEACHER_WIDTHS), "dropout": demo.TEACHER_DROPOUT}
    assert cfg["student"]["options"] == {"widths": list(demo.STUDENT_WIDTHS)}
    assert (cfg["teacher"]["epochs"], cfg["student"]["epochs"]) == (demo.TEACHER_EPOCHS, demo.DEFAULT_EPOCHS)
    assert (cfg["teacher"]["optimizer"]["lr"], cfg["student"]["optimizer"]["lr"]) == (demo.TEACHER_LR, demo.LR)
    assert cfg["methods"] == [{"name": "kd", "T": demo.KD_T, "weight": demo.KD_WEIGHT}]
    assert cfg["student"]["task_weight"] == demo.TASK_WEIGHT
    assert cfg["data"]["options"]["batch_size"] == demo.BATCH_SIZE


def test_defaults_are_filled_in():
    cfg = validate(minimal())
    assert cfg["seed"] == 0 and cfg["device"] == "cpu" and cfg["threads"] is None
    assert cfg["teacher"]["epochs"] == 0 and cfg["teacher"]["checkpoint"] is None
    assert cfg["teacher"]["optimizer"] == {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01, "betas": [0.9, 0.999]}
    assert cfg["student"]["scheduler"] == {"name": "cosine", "warmup": 0.05}
    assert cfg["student"]["task_weight"] == 1.0 and cfg["student"]["input"] is None
    assert cfg["transfer"] is None and cfg["augmentations"] == [] and cfg["weight_schedules"] == {}
    assert cfg["training"] == {"amp": None, "grad_clip": None, "cache_teacher": False, "cache_dtype": "float16",
                               "cache_top_k": None, "progress": None, "strategy": "ddp", "shard_teacher": False,
                               "balance": None, "balance_primary": None, "balance_every": None}
    assert cfg["data"]["options"] == {}


def test_values_are_normalised():
    raw = with_value("student.optimizer", {"name": "sgd", "lr": 1, "momentum": 0.9})
    raw["augmentations"] = ["flip", {"name": "noise", "std": 0.1}]
    raw["weight_schedules"] = {"kd": {"start": 0, "end": 1, "epochs": 2}}
    cfg = validate(raw)
    opt = cfg["student"]["optimizer"]
    assert opt == {"name": "sgd", "lr": 1.0, "weight_decay": 0.0, "momentum": 0.9, "nesterov": False}
    assert isinstance(opt["lr"], float)
    assert cfg["augmentations"] == [{"name": "flip"}, {"name": "noise", "std": 0.1}]
    assert cfg["weight_schedules"] == {"kd": {"kind": "linear", "start": 0.0, "end": 1.0, "epochs": 2.0}}
    # method, transfer and builder options pass through untouched (their receivers check them)
    assert cfg["methods"] == [{"name": "kd", "T": 2.0}]


def test_json_null_means_unset_only_where_a_key_may_be_unset():
    raw = minimal()
    raw.update(threads=None, transfer=None)
    raw["teacher"]["checkpoint"] = None
    raw["training"] = {"amp": None, "grad_clip": None, "progress": None}
    assert validate(raw)["threads"] is None
    assert problems(with_value("student.epochs", None)) == [
        "student.epochs: expected an integer >= 1, got None (null)"]


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, where, valid", [
    ("outputdir", "the top level", "seed, output_dir, device, threads, data, teacher, student, methods"),
    ("data.option", "[data]", "builder, options"),
    ("teacher.epoch", "[teacher]", "builder, options, pretrained, checkpoint, epochs, optimizer, scheduler"),
    ("student.checkpoint", "[student]", "builder, options, pretrained, config, epochs, optimizer, scheduler, "
                                        "task_weight"),
    ("teacher.optimizer.momentun", "[teacher.optimizer]", "name, lr, weight_decay, betas, momentum, nesterov"),
    ("student.scheduler.warm_up", "[student.scheduler]", "name, warmup"),
    ("training.amp_dtype", "[training]", "amp, grad_clip, cache_teacher, cache_dtype, cache_top_k, progress"),
    ("weight_schedules.kd", "[weight_schedules.kd]", "kind, start, end, epochs"),
])
def test_unknown_keys_at_any_level_list_the_valid_keys(path, where, valid):
    if path == "weight_schedules.kd":
        raw = minimal()
        raw["weight_schedules"] = {"kd": {"start": 0, "end": 1, "epochs": 1, "stop": 2}}
        path = "weight_schedules.kd.stop"
    else:
        raw = with_value(path, 1)
    (message,) = problems(raw)
    assert message.startswith(f"unknown key {path!r} in {where}")
    assert f"valid keys there: {valid}" in message


def test_unknown_key_suggests_the_close_one():
    (message,) = problems(with_value("student.epoch", 3))
    assert "(did you mean 'epochs'?)" in message


@pytest.mark.parametrize("path, value, expected", [
    ("seed", "0", "seed: expected an integer >= 0, got '0' (string)"),
    ("seed", True, "seed: expected an integer >= 0, got True (boolean)"),
    ("threads", 0, "threads: expected an integer >= 1, got 0 (integer)"),
    ("output_dir", 3, "output_dir: expected a non-empty string, got 3 (integer)"),
    ("device", "gpu", "device: expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got 'gpu'"),
    ("data", "digits", "data: expected a table, got 'digits' (string)"),
    ("data.builder", "distillx.config.data.digits",
     "data.builder: expected \"module:callable\" (e.g. \"distillx.config.data:digits\"), got "
     "'distillx.config.data.digits' (string)"),
    ("data.options", [1], "data.options: expected a table, got [1] (array)"),
    ("teacher.epochs", 2.0, "teacher.epochs: expected an integer >= 0, got 2.0 (float)"),
    ("student.epochs", 0, "student.epochs: expected an integer >= 1, got 0 (integer)"),
    ("student.task_weight", -1, "student.task_weight: expected a finite number >= 0.0, got -1 (integer)"),
    ("teacher.checkpoint", 5, "teacher.checkpoint: expected a non-empty string, got 5 (integer)"),
    ("teacher.optimizer.name", "lamb",
     "teacher.optimizer.name: expected one of 'adamw', 'adam', 'sgd', got 'lamb' (string)"),
    ("teacher.optimizer.lr", "1e-3", "teacher.optimizer.lr: expected a finite number > 0.0, got '1e-3' (string)"),
    ("teacher.optimizer.lr", float("nan"), "teacher.optimizer.lr: expected a finite number > 0.0, got nan (float)"),
    ("student.optimizer.betas", [0.9], "student.optimizer.betas: expected an array of two floats in [0, 1), "
                                       "got [0.9] (array)"),
    ("student.scheduler.name", "step", "student.scheduler.name: expected one of 'cosine', 'linear', 'constant', "
                                       "'none', got 'step' (string)"),
    ("student.scheduler.warmup", 1.0, "student.scheduler.warmup: expected an integer >= 0 (steps) or a float in "
                                      "[0, 1) (a fraction of all steps), got 1.0 (float)"),
    ("methods", {"name": "kd"}, "methods: expected an array of tables ([[methods]] with name and options), got "
                                "{'name': 'kd'} (table)"),
    ("methods.0", "kd", "methods.0: expected a table with name = <method> and its options, got 'kd' (string)"),
    ("methods.0.name", 1, "methods.0.name: expected a non-empty string, got 1 (integer)"),
    ("transfer", "select", "transfer: expected a table with name = <weight transfer> and its options, got "
                           "'select' (string)"),
    ("augmentations", [3], "augmentations.0: expected an augmentation name or a table with name and options, "
                           "got 3 (integer)"),
    ("training.amp", "fp8", "training.amp: expected one of 'bf16', 'fp16', got 'fp8' (string)"),
    ("training.cache_teacher", "yes", "training.cache_teacher: expected a boolean (true or false), got 'yes' "
                                      "(string)"),
    ("training.cache_top_k", 0, "training.cache_top_k: expected an integer >= 1, got 0 (integer)"),
    ("training.grad_clip", 0, "training.grad_clip: expected a finite number > 0.0, got 0 (integer)"),
])
def test_wrong_types_name_the_path_the_expected_type_and_the_value(path, value, expected):
    assert problems(with_value(path, value)) == [expected]


def test_weight_schedule_values_are_checked():
    raw = minimal()
    raw["weight_schedules"] = {"kd": {"kind": "step", "start": -1, "end": 1, "epochs": 0}}
    assert problems(raw) == ["weight_schedules.kd.kind: expected one of 'linear', got 'step' (string)",
                             "weight_schedules.kd.start: expected a finite number >= 0.0, got -1 (integer)",
                             "weight_schedules.kd.epochs: expected a finite number > 0.0, got 0 (integer)"]


def test_missing_required_keys_are_named():
    raw = minimal()
    del raw["output_dir"], raw["student"]["epochs"], raw["data"]["builder"]
    del raw["teacher"], raw["student"]["builder"]
    raw["methods"] = [{"T": 2.0}]
    msgs = problems(raw)
    assert len(msgs) == 6
    for key in ("output_dir", "teacher", "student.epochs", "methods.0.name"):
        assert any(m.startswith(f"missing required key {key!r}") for m in msgs), (key, msgs)
    # a model or the data comes from exactly one source
    assert "data: give exactly one of builder, text, chat, dataset (got none)" in msgs
    assert "student: give exactly one of builder, pretrained, config (got none)" in msgs
    both = minimal()
    both["teacher"]["pretrained"] = "models/t"
    with pytest.raises(ConfigError, match=r"teacher: give exactly one of builder, pretrained \(got builder and "
                                          r"pretrained\)"):
        validate(both)


def test_all_problems_are_reported_together_with_the_source():
    raw = with_value("seed", -1)
    raw["student"]["epochs"] = "5"
    raw["bogus"] = 1
    with pytest.raises(ConfigError) as info:
        validate(raw, "my.toml")
    text = str(info.value)
    assert text.startswith("my.toml: 3 problems\n")
    assert "  - seed: expected an integer >= 0, got -1 (integer)" in text
    assert "  - student.epochs: expected an integer >= 1, got '5' (string)" in text
    assert "  - unknown key 'bogus' in the top level" in text


def test_optimizer_keys_that_do_not_apply_are_errors():
    assert problems(with_value("teacher.optimizer", {"name": "adamw", "momentum": 0.9})) == [
        "teacher.optimizer.momentum: applies to sgd only, not 'adamw'"]
    assert problems(with_value("teacher.optimizer", {"name": "sgd", "betas": [0.9, 0.99]})) == [
        "teacher.optimizer.betas: applies to adam and adamw only, not 'sgd'"]
    assert problems(with_value("teacher.optimizer", {"name": "sgd", "nesterov": True})) == [
        "teacher.optimizer.nesterov: needs momentum > 0"]
    assert validate(with_value("teacher.optimizer", {"name": "adam"}))["teacher"]["optimizer"]["weight_decay"] == 0.0


def test_the_config_must_be_a_table():
    with pytest.raises(ConfigError, match=r"the config must be a table \(a JSON object\), got \[1\] \(array\)"):
        validate([1])


def test_every_key_is_documented():
    paths = schema.key_paths()
    assert "teacher.optimizer.nesterov" in paths and "weight_schedules.TERM.epochs" in paths
    for doc in (schema.__doc__, dxc.__doc__):
        for path in paths:
            name = path.rsplit(".", 1)[-1]
            if name in ("N", "TERM"):
                continue
            assert re.search(rf"\b{name}\b", doc), f"{path} is not documented"
    for section in ("[data]", "[teacher]", "[student]", "[[methods]]", "[transfer]", "[[augmentations]]",
                    "[weight_schedules]", "[training]", "[logging]"):
        assert section in schema.__doc__ and section in dxc.__doc__


# -- reading files -------------------------------------------------------------------------------
def test_toml_needs_tomllib_or_tomli(monkeypatch, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('output_dir = "x"\n')
    tomllib = pytest.importorskip("tomllib")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python < 3.11
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ConfigError, match=r"needs Python >= 3.11 \(tomllib\) or the tomli package .*write the "
                                          r"config as JSON"):
        run_mod.read_config(str(path))
    fake = types.ModuleType("tomli")
    fake.loads, fake.TOMLDecodeError = tomllib.loads, tomllib.TOMLDecodeError
    monkeypatch.setitem(sys.modules, "tomli", fake)
    assert run_mod.read_config(str(path))[1] == {"output_dir": "x"}


def test_without_a_toml_reader_bundled_names_use_the_json_config(monkeypatch):
    assert run_mod.read_config("digits")[0] == "bundled config 'digits.toml'"
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    source, raw = run_mod.read_config("digits")
    assert source == "bundled config 'digits.json'" and raw["methods"][0]["name"] == "kd"
    assert parse_value("[1, 2,]") == "[1, 2,]"  # --set values: JSON only, else strings


@pytest.mark.parametrize("name, text, expected", [
    ("c.toml", "seed = = 1", r"c\.toml: invalid TOML: "),
    ("c.json", '{"seed": 1,}', r"c\.json: invalid JSON: "),
    ("c.yaml", "seed: 1", r"unsupported file type '\.yaml'; use \.toml or \.json"),
])
def test_unreadable_configs(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        run_mod.read_config(str(path))


def test_bundled_configs_are_found_by_name():
    assert set(run_mod.bundled_configs()) >= {"digits"}
    assert run_mod.read_config("digits")[0] == "bundled config 'digits.toml'"
    assert run_mod.read_config("digits.json")[0] == "bundled config 'digits.json'"
