"""Tied weights (``head.weight is emb.weight``): found in a tied teacher under every name, written
once into a tied student (which stays tied) and reported once per name."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import distillx as dx
from distillx.transfer import TransferError, transferable_tensors
from distillx.transfer.tensors import tied_names

from . import helpers


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> output layer over the vocabulary; ``tie=True`` shares the embedding
    matrix with the output layer, as GPT-2 and BERT's masked-LM head do."""

    def __init__(self, vocab: int = 10, dim: int = 8, tie: bool = False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.norm(self.emb(tokens)))


def models(teacher_tied: bool, student_tied: bool, student_dim: int = 8, seed: int = 0):
    """A (teacher, student) pair of :class:`TinyLM`, tied as asked."""
    torch.manual_seed(seed)
    teacher = TinyLM(tie=teacher_tied)
    with torch.no_grad():  # every teacher tensor distinct from a fresh model's (LayerNorm starts at ones/zeros)
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    return teacher, TinyLM(dim=student_dim, tie=student_tied)


def test_transferable_tensors_lists_a_tied_tensor_once_and_with_aliases_under_every_name():
    model = TinyLM(tie=True)
    assert list(transferable_tensors(model)) == ["emb.weight", "norm.weight", "norm.bias"]
    every = transferable_tensors(model, aliases=True)
    assert list(every) == ["emb.weight", "norm.weight", "norm.bias", "head.weight"]
    assert every["head.weight"][0] is model.emb.weight and every["head.weight"][1] == "parameter"
    assert tied_names(model) == {"head.weight": "emb.weight"}
    assert tied_names(TinyLM()) == {} and list(transferable_tensors(TinyLM(), aliases=True)) == \
        list(transferable_tensors(TinyLM()))


@pytest.mark.parametrize("strategy", ["direct", "select", "distribution"])
def test_a_tied_teachers_head_is_found_by_an_untied_student(strategy):
    teacher, student = models(teacher_tied=True, student_tied=False)
    options = {"seed": 0} if strategy == "distribution" else {}
    report = dx.transfer(strategy, teacher, student, **options)
    record = report["head.weight"]
    assert record.action != "skipped", record.reason
    assert record.source == "head.weight" and record.reason.startswith("output layer")
    if strategy != "distribution":
        torch.testing.assert_close(student.head.weight, teacher.emb.weight, rtol=0, atol=0)
    assert student.head.weight is not student.emb.weight  # the student stays untied


def test_a_mapping_may_name_a_tied_teachers_alias():
    teacher, student = models(teacher_tied=True, student_tied=False)
    report = dx.transfer("direct", teacher, student, mapping={"emb.weight": "head.weight"})
    assert report["emb.weight"].source == "head.weight"
    torch.testing.assert_close(student.emb.weight, teacher.emb.weight, rtol=0, atol=0)


@pytest.mark.parametrize("teacher_tied", [False, True])
def test_a_tied_student_stays_tied_and_is_reported_under_both_names(teacher_tied):
    teacher, student = models(teacher_tied=teacher_tied, student_tied=True)
    report = dx.transfer("direct", teacher, student)
    assert student.head.weight is student.emb.weight
    torch.testing.assert_close(student.emb.weight, teacher.emb.weight, rtol=0, atol=0)
    assert report.complete and sorted(report.expected) == sorted(dict(student.state_dict()))
    assert [r.name for r in report].count("head.weight") == 1
    head = report["head.weight"]
    # honest: it holds the teacher's emb.weight (what emb.weight got), not the teacher's head.weight
    assert (head.action, head.source) == ("copied", "emb.weight")
    assert head.reason.startswith("tied to 'emb.weight'")


def test_a_narrower_tied_pair_is_selected_once():
    teacher, student = models(teacher_tied=True, student_tied=True, student_dim=4)
    report = dx.transfer("select", teacher, student)
    assert student.head.weight is student.emb.weight
    torch.testing.assert_close(student.emb.weight, helpers.select(teacher.emb.weight.detach(), (10, 4)),
                               rtol=0, atol=0)
    assert report["head.weight"].action == report["emb.weight"].action == "adapted"


def test_strategies_called_directly_report_every_name():
    teacher, student = models(teacher_tied=False, student_tied=True)
    report = dx.transfer.direct(teacher, student)
    assert report.complete and report["head.weight"].source == "emb.weight"


def test_a_mapping_through_a_student_alias_writes_the_tied_tensor():
    teacher, student = models(teacher_tied=False, student_tied=True)
    report = dx.transfer("direct", teacher, student, mapping={"head.weight": "head.weight"})
    torch.testing.assert_close(student.emb.weight, teacher.head.weight, rtol=0, atol=0)
    assert report["emb.weight"].source == report["head.weight"].source == "head.weight"
    with pytest.raises(TransferError, match="'head.weight' is tied to 'emb.weight'"):
        dx.transfer("direct", teacher, student, mapping={"emb.weight": "emb.weight", "head.weight": "head.weight"})


def test_head_fit_refuses_a_tied_head_and_leaves_the_student_unchanged():
    teacher, student = models(teacher_tied=False, student_tied=True)
    before = helpers.snapshot(student)
    with pytest.raises(TransferError, match="output layer 'head' is tied to emb.weight"):
        dx.transfer("head_fit", teacher, student, calibration=[torch.randint(0, 10, (4, 6))])
    helpers.assert_unchanged(student, before)
