"""Models on the ``meta`` device (shapes, no data) are a clear TransferError, not a silent no-op
(meta student) or a NotImplementedError from deep inside PyTorch (meta teacher)."""
from __future__ import annotations

import pytest
import torch

import distillx as dx
from distillx.transfer import TransferError

from . import helpers
from .models import TinyTransformer

OPTIONS = {  # every built-in strategy, with the options it needs on TinyTransformer
    "direct": {},
    "select": {},
    "layer_map": {},
    "distribution": {"seed": 0},
    "head_fit": {"calibration": [torch.randint(0, 30, (4, 8))]},
}


def on_meta(**kwargs) -> TinyTransformer:
    with torch.device("meta"):
        return TinyTransformer(**kwargs)


@pytest.mark.parametrize("strategy", sorted(OPTIONS))
def test_a_meta_student_is_an_error_naming_it_and_to_empty(strategy):
    with pytest.raises(TransferError, match=r"the student is on the 'meta' device .*embed\.weight.*to_empty"):
        dx.transfer(strategy, TinyTransformer(layers=2), on_meta(dim=16, layers=1), **OPTIONS[strategy])


@pytest.mark.parametrize("strategy", sorted(OPTIONS))
def test_a_meta_teacher_is_an_error_and_leaves_the_student_unchanged(strategy):
    student = TinyTransformer(dim=16, layers=1)
    before = helpers.snapshot(student)
    with pytest.raises(TransferError, match=r"the teacher is on the 'meta' device .*load_state_dict"):
        dx.transfer(strategy, on_meta(layers=2), student, **OPTIONS[strategy])
    helpers.assert_unchanged(student, before)


def test_one_meta_buffer_is_named_and_strategies_called_directly_check_too():
    teacher, student = TinyTransformer(), TinyTransformer()
    student.register_buffer("scale", torch.empty(3, device="meta"))
    with pytest.raises(TransferError, match=r"student is on the 'meta' device \(no data in: scale\)"):
        dx.transfer.direct(teacher, student)


def test_materialising_as_the_message_says_makes_the_transfer_work():
    teacher, student = TinyTransformer(layers=2), on_meta(dim=16, layers=1)
    student.to_empty(device="cpu")
    report = dx.transfer("select", teacher, student)
    assert report.transferred == len(report)
    torch.testing.assert_close(student.head.bias, teacher.head.bias, rtol=0, atol=0)
