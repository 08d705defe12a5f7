"""``distillx.transfer``: registry lookup, option checks, atomicity, ensembles, deferred transfers."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import distillx as dx
import distillx.transfer.report as report_module
from distillx.cli import plugins as plugins_cli
from distillx.plugin import UnknownNameError, get_registries
from distillx.transfer import BUILTIN_TRANSFERS, Transfer, TransferError, TransferReport

from . import helpers
from .models import ConvNet, TinyTransformer, mlp

BUILTINS = {"direct", "distribution", "select", "layer_map", "head_fit", "prune"}


def test_builtins_are_registered_through_the_plugin_registry():
    transfers = get_registries().transfers
    assert BUILTINS <= set(transfers.names())
    assert set(BUILTIN_TRANSFERS) == BUILTINS
    for name in BUILTINS:
        assert transfers.provider(name) == "distillx.transfer"
        assert transfers.get(name) is BUILTIN_TRANSFERS[name]


def test_plugins_command_lists_them(capsys):
    assert plugins_cli.main(["--json"]) == 0
    listed = {t["name"]: t for t in json.loads(capsys.readouterr().out)["transfers"]}
    assert BUILTINS <= set(listed)
    assert listed["select"]["object"] == "distillx.transfer.selection.select"


def test_transfer_is_the_package_and_callable():
    assert callable(dx.transfer) and dx.transfer.TransferReport is TransferReport
    assert report_module.TransferReport is dx.TransferReport
    assert issubclass(dx.TransferError, ValueError)
    report = dx.plugin.transfer("direct", mlp(), mlp())
    assert isinstance(report, TransferReport)


def test_success_writes_in_place_and_keeps_parameter_identity():
    torch.manual_seed(0)
    teacher, student = mlp((64, 48)), mlp((32, 24))
    params = {n: id(p) for n, p in student.named_parameters()}
    report = dx.transfer("select", teacher, student)
    assert {n: id(p) for n, p in student.named_parameters()} == params  # an optimizer on them stays valid
    torch.testing.assert_close(student[0].weight, helpers.select(teacher[0].weight, (32, 12)), rtol=0, atol=0)
    assert report.complete and report.expected == tuple(n for n, _ in student.named_parameters())


def test_unknown_strategy_and_option():
    with pytest.raises(UnknownNameError, match="unknown weight transfer 'selct'.*'select'"):
        dx.transfer("selct", mlp(), mlp())
    with pytest.raises(TypeError, match="'select' has no option 'layer' .did you mean 'layers'.*mapping"):
        dx.transfer("select", mlp(), mlp(), layer="first")
    with pytest.raises(TypeError, match="no option 'layer'"):
        dx.transfer("select", layer="first")  # checked for deferred transfers too


def test_non_module_arguments():
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module instance, got dict"):
        dx.transfer("direct", {"w": torch.zeros(2)}, mlp())
    with pytest.raises(TypeError, match="student must be a torch.nn.Module instance, got the class Linear"):
        dx.transfer("direct", mlp(), nn.Linear)
    with pytest.raises(TypeError, match="needs both teacher and student"):
        dx.transfer("direct", mlp())


def test_unrelated_architectures_are_an_error_unless_allowed():
    teacher, student = ConvNet(), TinyTransformer()
    before = helpers.snapshot(student)
    with pytest.raises(TransferError, match="transferred nothing.*look unrelated.*allow_empty=True"):
        dx.transfer("select", teacher, student)
    helpers.assert_unchanged(student, before)
    report = dx.transfer("direct", teacher, student, allow_empty=True)
    assert report.counts()["skipped"] == len(report)
    assert "must match (output layer" in report["head.weight"].reason  # 10 classes vs 4
    assert "teacher has no tensor 'embed.weight'" in report["embed.weight"].reason


def test_mapping_to_a_missing_tensor_names_it():
    teacher, student = ConvNet(), ConvNet(8, 16)
    before = helpers.snapshot(student)
    with pytest.raises(TransferError, match="teacher has no tensor 'fc.weights'.*Close names: fc.weight"):
        dx.transfer("direct", teacher, student, mapping={"fc.weight": "fc.weights"})
    helpers.assert_unchanged(student, before)


def register(name, strategy):
    get_registries().transfers.add(name, strategy)


def write_everything(student):
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(42.0)


def test_a_failing_strategy_leaves_the_student_unchanged():
    def explode(teacher, student):
        write_everything(student)
        raise RuntimeError("boom halfway")

    register("explode", explode)
    teacher, student = mlp(), mlp()
    before = helpers.snapshot(student)
    with pytest.raises(RuntimeError, match="boom halfway"):
        dx.transfer("explode", teacher, student)
    helpers.assert_unchanged(student, before)


@pytest.mark.parametrize("result,match", [
    ("incomplete", "incomplete report: no record for 5 student tensor"),
    ("not a report", "returned str, not a TransferReport"),
    ("reshaped", r"changed the student's structure.*0\.weight"),
])
def test_a_strategy_breaking_its_contract_is_rejected_and_changes_nothing(result, match):
    def broken(teacher, student):
        write_everything(student)
        if result == "reshaped":
            student[0].weight = nn.Parameter(torch.zeros(3, 3))
        if result == "not a report":
            return result
        report = TransferReport.for_model("broken", student)
        report.skipped("0.bias", (64,), "only one record")
        return report

    register("broken", broken)
    student = mlp()
    before = helpers.snapshot(student)
    with pytest.raises(TransferError, match=match):
        dx.transfer("broken", mlp(), student)
    helpers.assert_unchanged(student, before)


def test_a_third_party_strategy_with_free_options():
    def scaled_copy(teacher, student, **options):
        report = TransferReport.for_model("scaled", student)
        for (name, p), t in zip(student.named_parameters(), teacher.parameters()):
            with torch.no_grad():
                p.copy_(t * options["factor"])
            report.adapted(name, p.shape, name, t.shape, "scale", "same position")
        return report

    register("scaled", scaled_copy)
    teacher, student = mlp(), mlp()
    dx.transfer("scaled", teacher, student, factor=2.0)
    assert torch.equal(student[0].weight, 2 * teacher[0].weight)


def test_deferred_transfer():
    deferred = dx.transfer("select", layers="uniform")
    assert isinstance(deferred, Transfer) and deferred.options == {"layers": "uniform"}
    teacher, student = TinyTransformer(layers=4), TinyTransformer(layers=2)
    report = deferred(teacher, student)
    assert report["encoder.layers.1.norm1.weight"].source == "encoder.layers.3.norm1.weight"
    members = dx.transfer("distribution", n=2, seed=5)(teacher, student)
    assert [m.report["head.weight"].seed for m in members] == [5, 6]
