"""Rules every loss in distillx.functional follows (its module docstring): empty inputs (no samples is
0 with a zero gradient, an empty dimension within a sample is a ValueError naming the argument), the
temperature range of the divergences, attention maps finite for any p, chunk sizes beyond int64, and
arguments of the wrong kind named in the error."""
from __future__ import annotations

import re

import pytest
import torch

from distillx import functional as DF
from distillx.features import attention_map as attention_map_reduction
from distillx.ops import reference as ref

F32, F64 = torch.float32, torch.float64


def randn(*shape, dtype=F32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- empty inputs ----------------------------------------------------------------------------------
# name -> (call, the student tensor, the expected shape of the loss)
NO_SAMPLES = {
    "kd": (lambda x: DF.kd_loss(x, randn(0, 5)), randn(0, 5), ()),
    "kd-leading-0": (lambda x: DF.kd_loss(x, randn(2, 0, 5), reduction="sum"), randn(2, 0, 5), ()),
    "kd-none": (lambda x: DF.kd_loss(x, randn(0, 5), reduction="none"), randn(0, 5), (0,)),
    "linear_kd": (lambda x: DF.linear_kd_loss(x, randn(6, 3), randn(0, 4), randn(6, 4)), randn(0, 3), ()),
    "gram": (lambda x: DF.kernel_gram_loss(x, randn(0, 4), "rbf"), randn(0, 3), ()),
    "gram-maps": (lambda x: DF.kernel_gram_loss(x, randn(0, 2, 2), "linear", normalize_rows=True), randn(0, 3, 2), ()),
    "mmd-no-student-rows": (lambda x: DF.mmd_loss(x, randn(5, 3)), randn(0, 3), ()),
    "mmd-no-teacher-rows": (lambda x: DF.mmd_loss(x, randn(0, 3), "rbf"), randn(4, 3), ()),
    "attention_map": (lambda x: DF.attention_map_loss(x, randn(0, 5, 2, 2)), randn(0, 3, 4, 4), ()),
    "relation-B": (lambda x: DF.attention_relation_loss(x, x, randn(0, 2, 5, 4), randn(0, 2, 5, 4)),
                   randn(0, 2, 5, 3), ()),
    "relation-A": (lambda x: DF.attention_relation_loss(x, x, randn(2, 0, 5, 4), randn(2, 0, 5, 4)),
                   randn(2, 0, 5, 3), ()),
    "relation-L": (lambda x: DF.attention_relation_loss(x, x, randn(2, 2, 0, 4), randn(2, 2, 0, 4)),
                   randn(2, 2, 0, 3), ()),
}


@pytest.mark.parametrize("name", list(NO_SAMPLES))
def test_no_samples_is_zero_with_a_zero_gradient(name):
    call, x, shape = NO_SAMPLES[name]
    x = x.clone().requires_grad_(True)
    loss = call(x)
    assert loss.shape == shape and loss.dtype == x.dtype, (loss.shape, loss.dtype)
    assert (loss == 0).all()
    loss.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and (x.grad == 0).all()


EMPTY_WITHIN = [
    ("kd-C", lambda: DF.kd_loss(randn(4, 0), randn(4, 0)), "student_logits has an empty class dimension "
                                                           r"\(dimension 1 of shape \(4, 0\)\)"),
    ("kd-C-no-rows", lambda: DF.kd_loss(randn(0, 0), randn(0, 0)), "student_logits has an empty class dimension"),
    ("linear-C", lambda: DF.linear_kd_loss(randn(4, 3), randn(0, 3), randn(4, 5), randn(0, 5)),
     r"student_weight has an empty class dimension \(dimension 0 of shape \(0, 3\)\)"),
    ("linear-Hs", lambda: DF.linear_kd_loss(randn(4, 0), randn(6, 0), randn(4, 5), randn(6, 5)),
     "student_hidden has an empty hidden width"),
    ("linear-Ht", lambda: DF.linear_kd_loss(randn(4, 3), randn(6, 3), randn(4, 0), randn(6, 0)),
     "teacher_hidden has an empty hidden width"),
    ("gram-D", lambda: DF.kernel_gram_loss(randn(4, 0), randn(4, 3)), r"s has an empty feature dimension \(dimension 1"),
    ("gram-Dt", lambda: DF.kernel_gram_loss(randn(4, 3), randn(4, 2, 0)), r"t has an empty feature dimension \(dimension 2"),
    ("gram-N-and-D", lambda: DF.kernel_gram_loss(randn(0, 0), randn(0, 3)), "s has an empty feature dimension"),
    ("mmd-D", lambda: DF.mmd_loss(randn(4, 0), randn(5, 0)), "s has an empty feature dimension"),
    ("at-C", lambda: DF.attention_map_loss(randn(2, 0, 4, 4), randn(2, 3, 4, 4)),
     r"f_s has an empty channel or spatial dimension \(dimension 1 of shape \(2, 0, 4, 4\)\)"),
    ("at-H", lambda: DF.attention_map_loss(randn(2, 3, 0, 4), randn(2, 3, 4, 4)), "f_s has an empty channel or spatial"),
    ("at-Wt", lambda: DF.attention_map_loss(randn(2, 3, 4, 4), randn(2, 3, 4, 0)), "f_t has an empty channel or spatial"),
    ("relation-ds", lambda: DF.attention_relation_loss(randn(2, 2, 5, 0), randn(2, 2, 5, 0), randn(2, 2, 5, 4),
                                                       randn(2, 2, 5, 4)), "q_s has an empty head width"),
    ("relation-dt", lambda: DF.attention_relation_loss(randn(2, 2, 5, 3), randn(2, 2, 5, 3), randn(2, 2, 5, 0),
                                                       randn(2, 2, 5, 0)), "q_t has an empty head width"),
]


@pytest.mark.parametrize("call, match", [c[1:] for c in EMPTY_WITHIN], ids=[c[0] for c in EMPTY_WITHIN])
def test_an_empty_dimension_within_a_sample_is_an_error_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- temperature --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", ["kd", "linear_kd"])
@pytest.mark.parametrize("dtype, temperature", [(F32, 1e20), (F32, 1001.0), (F32, 1e-19), (torch.bfloat16, 1e4),
                                                (F64, 1.1e7), (F64, 1e-200)], ids=str)
def test_a_temperature_outside_the_working_range_is_refused(fn, dtype, temperature):
    low, high = DF.TEMPERATURE_RANGE[F64 if dtype == F64 else F32]
    call = {"kd": lambda: DF.kd_loss(randn(4, 6, dtype=dtype), randn(4, 6, dtype=dtype), temperature=temperature),
            "linear_kd": lambda: DF.linear_kd_loss(randn(4, 3, dtype=dtype), randn(6, 3, dtype=dtype),
                                                   randn(4, 5, dtype=dtype), randn(6, 5, dtype=dtype),
                                                   temperature=temperature)}[fn]
    with pytest.raises(ValueError, match=rf"^temperature must be in \[{re.escape(f'{low:g}')}, {re.escape(f'{high:g}')}\] "
                                         rf"for {str(dtype)[6:]} inputs .*got {re.escape(repr(temperature))}"):
        call()


@pytest.mark.parametrize("dtype, temperature, loss_rtol, grad_rtol", [
    (F32, 1e3, 5e-2, 1e-3), (F32, 100.0, 1e-3, 1e-4), (F32, 1e-18, 1e-4, 1e-4), (F64, 1e7, 5e-2, 1e-6),
    (F64, 1e-150, 1e-9, 1e-9)], ids=str)
def test_temperatures_at_the_ends_of_the_range_are_accurate(dtype, temperature, loss_rtol, grad_rtol):
    """The range's ends: the loss within a few percent (ε·T²), the gradient much closer (ε·T)."""
    s, t = randn(64, 50, seed=1) * 4, randn(64, 50, seed=2) * 4
    x = s.to(dtype).detach().requires_grad_(True)
    loss = DF.kd_loss(x, t.to(dtype), temperature=temperature)
    loss.backward()
    exact = s.double().requires_grad_(True)
    want = ref.kd_loss_reference(exact, t.double(), temperature)
    want.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=loss_rtol, atol=0)
    assert ((x.grad.double() - exact.grad).norm() / exact.grad.norm()).item() < grad_rtol


# -- attention maps for any p ----------------------------------------------------------------------------
def _naive_at_loss(f_s, f_t, p):
    """AT in float64 straight from the definition (no rescaling): with |F| < 2.5 and p <= 200, |F|^p and
    its square stay below 1e160."""
    def a(f):
        return torch.nn.functional.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1)
    return (a(f_s) - a(f_t)).pow(2).mean()


@pytest.mark.parametrize("p", [0.5, 2.0, 20.0, 200.0])
def test_attention_map_loss_is_finite_and_right_for_any_p(p):
    f_s, f_t = randn(3, 4, 5, 5, seed=3) * 0.7, randn(3, 6, 5, 5, seed=4) * 0.7
    assert f_s.abs().max() < 2.5 and f_t.abs().max() < 2.5
    x = f_s.clone().requires_grad_(True)
    loss = DF.attention_map_loss(x, f_t, p=p)
    loss.backward()
    exact = f_s.double().requires_grad_(True)
    want = _naive_at_loss(exact, f_t.double(), p)
    want.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=2e-4, atol=1e-7)
    # (for large p the gradient is tiny everywhere: the maps are nearly one-hot and the loss nearly flat)
    torch.testing.assert_close(x.grad.double(), exact.grad, rtol=2e-3, atol=max(1e-5 * exact.grad.abs().max().item(), 1e-9))
    ref_loss = ref.attention_map_loss_reference(f_s, f_t, p)
    torch.testing.assert_close(ref_loss.double(), want.detach(), rtol=2e-4, atol=1e-7)


def test_the_attention_map_reduction_is_finite_for_large_p():
    f = randn(2, 4, 3, 3, seed=5) * 0.7
    assert f.abs().max() < 2.5
    for channel_dim, x in ((1, f), (-1, f.flatten(2).transpose(1, 2))):
        a = attention_map_reduction(x, p=200.0, channel_dim=channel_dim)
        want = torch.nn.functional.normalize(x.double().abs().pow(200.0).mean(channel_dim).flatten(1), dim=1)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), want, rtol=2e-4, atol=1e-7)


# -- other arguments ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [2**31, 2**63, 2**70], ids=["2**31", "2**63", "2**70"])
def test_a_chunk_size_beyond_the_rows_is_one_chunk(chunk_size):
    hs, ws, ht, wt = randn(5, 3, seed=6), randn(7, 3, seed=7), randn(5, 4, seed=8), randn(7, 4, seed=9)
    x = hs.clone().requires_grad_(True)
    loss = DF.linear_kd_loss(x, ws, ht, wt, chunk_size=chunk_size)
    loss.backward()
    y = hs.clone().requires_grad_(True)
    want = DF.linear_kd_loss(y, ws, ht, wt, chunk_size=5)
    want.backward()
    assert torch.equal(loss, want) and torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, torch.tensor(True)], ids=repr)
def test_normalize_rows_must_be_a_bool(value):
    with pytest.raises(TypeError, match=r"^normalize_rows must be True or False, got"):
        DF.kernel_gram_loss(randn(4, 3), randn(4, 2), "linear", normalize_rows=value)


@pytest.mark.parametrize("fn", [DF.kernel_gram_loss, DF.mmd_loss], ids=["gram", "mmd"])
def test_an_unknown_kernel_lists_each_kernel_once(fn):
    with pytest.raises(ValueError) as info:
        fn(randn(4, 3), randn(4, 3), kernel="gaussian")
    message = str(info.value)
    assert message.startswith("kernel must be one of linear, polynomial, rbf, chebyshev, cosine or a callable "
                              "k(x, z); got 'gaussian'"), message
    for name in ("linear", "polynomial", "rbf", "chebyshev", "cosine"):
        assert message.count(name) == 1, (name, message)
