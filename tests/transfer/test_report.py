"""TransferReport: records, completeness, counts, summary and JSON."""
from __future__ import annotations

import json

import pytest

from distillx.transfer import ACTIONS, TransferError, TransferReport

from .models import ConvNet


def full_report() -> TransferReport:
    r = TransferReport("demo", ["a.weight", "a.bias", "b.weight", "c.weight", "d.running_mean"],
                       kinds={"d.running_mean": "buffer"})
    r.copied("a.weight", (4, 3), "x.weight")
    r.adapted("a.bias", (4,), "x.bias", (8,), "select-uniform", "same name")
    r.sampled("b.weight", (2, 4), "y.weight", (2, 8), "normal(mean=0, std=1)", 7, "output layer")
    r.fitted("c.weight", (2, 2), "teacher logits", "ridge", "fitted on 10 rows")
    r.skipped("d.running_mean", (4,), "no counterpart")
    return r


def test_counts_names_and_lookup():
    r = full_report()
    assert r.counts() == {"copied": 1, "adapted": 1, "sampled": 1, "fitted": 1, "skipped": 1}
    assert list(r.counts()) == list(ACTIONS)
    assert r.transferred == 4 and len(r) == 5
    assert r.names("adapted") == ["a.bias"]
    assert r["b.weight"].seed == 7 and r["d.running_mean"].kind == "buffer"
    with pytest.raises(KeyError, match="nope"):
        r["nope"]
    with pytest.raises(ValueError, match="unknown action"):
        r.names("moved")


def test_complete_and_its_problems():
    r = full_report()
    assert r.complete and r.check_complete() is r
    r.skipped("a.weight", (4, 3), "twice")
    r.skipped("zzz", (1,), "not a student tensor")
    problems = " ".join(r.problems())
    assert "more than one record for: a.weight" in problems and "zzz" in problems
    missing = TransferReport("demo", ["a", "b"])
    missing.skipped("a", (1,), "x")
    assert not missing.complete
    with pytest.raises(TransferError, match="no record for 1 student tensor.*: b"):
        missing.check_complete()


def test_for_model_expects_parameters_and_float_buffers():
    r = TransferReport.for_model("demo", ConvNet(4, 8))
    assert "bn1.running_var" in r.expected and "bn1.num_batches_tracked" not in r.expected
    assert "conv1.weight" in r.expected and "fc.bias" in r.expected


def test_summary_and_str_show_every_tensor_with_its_reason():
    r = full_report()
    text = r.summary()
    assert str(r) == text
    assert text.splitlines()[0] == ("weight transfer 'demo': 1 copied, 1 adapted, 1 sampled, 1 fitted, 1 skipped "
                                    "(5 tensors)")
    assert "x.bias (8)->(4) [select-uniform]" in text
    assert "d.running_mean (buffer)" in text and "no counterpart" in text
    assert "normal(mean=0, std=1) seed=7" in text
    assert "INCOMPLETE" not in text
    r.skipped("a.weight", (4, 3), "again")
    assert "INCOMPLETE" in r.summary()
    assert repr(full_report()).startswith("TransferReport('demo', copied=1")


def test_to_dict_is_json_serialisable():
    data = json.loads(json.dumps(full_report().to_dict()))
    assert data["strategy"] == "demo" and data["complete"] is True
    assert data["counts"]["sampled"] == 1
    adapted = data["tensors"][1]
    assert adapted == {"name": "a.bias", "action": "adapted", "shape": [4], "reason": "same name",
                       "kind": "parameter", "source": "x.bias", "source_shape": [8], "how": "select-uniform",
                       "distribution": None, "seed": None}


def test_records_are_validated():
    r = TransferReport("demo", ["a"])
    with pytest.raises(ValueError, match="needs a reason"):
        r.skipped("a", (1,), "")
