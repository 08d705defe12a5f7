"""The result of a kernel given as a callable (or registered by a plugin) is checked before a loss uses
it: kernel_gram_loss and mmd_loss (and their references) accept only a floating-point tensor of shape
(N, M) for inputs of N and M rows; anything else is an error naming the kernel and what it returned
against what was expected (a scalar, a vector, an extra column and an int tensor trained silently)."""
from __future__ import annotations

import functools
import re

import pytest
import torch

import distillx.functional as DF
from distillx.ops import reference as ref

from .conftest import F64, close


def laplacian(x, z):
    return torch.exp(-torch.cdist(x, z, p=1))


# (kernel, the error's type, a pattern of what it says was found)
BAD_KERNELS = [
    (lambda a, b: (a @ b.T).sum(), ValueError, r"a tensor of shape \(\)"),
    (lambda a, b: (a @ b.T).sum(1), ValueError, r"a tensor of shape \({n},\)"),
    (lambda a, b: torch.cat([a @ b.T, a[:, :1]], 1), ValueError, r"a tensor of shape \({n}, {m1}\)"),
    (lambda a, b: (a @ b.T).T.reshape(-1, 1), ValueError, r"a tensor of shape \({nm}, 1\)"),
    (lambda a, b: (a @ b.T > 0).long(), TypeError, r"a tensor of dtype torch.int64"),
    (lambda a, b: (a @ b.T).tolist(), TypeError, r"list"),
    (lambda a, b: None, TypeError, r"NoneType"),
]
BAD_IDS = ["scalar", "vector", "extra-column", "flattened", "int", "list", "none"]


def _expect(pattern, n, m):
    return pattern.format(n=n, m1=m + 1, nm=n * m)


@pytest.mark.parametrize("kernel,error,found", BAD_KERNELS, ids=BAD_IDS)
def test_gram_rejects_a_bad_kernel_result(rng, kernel, error, found):
    """kernel_gram_loss (and its reference) with a callable returning anything but (N, N) floats: an
    error naming the callable (its __qualname__, and where a lambda was defined), what it returned,
    and the expected (N, N)."""
    s, t = rng.randn(5, 3, dtype=F64).requires_grad_(True), rng.randn(5, 4, dtype=F64)
    for loss in (DF.kernel_gram_loss, ref.kernel_gram_loss_reference):
        for normalize_rows in (False, True):
            with pytest.raises(error, match=r"^kernel <lambda> \(defined at test_kernel_results.py:\d+\) returned ") as info:
                loss(s, t, kernel, normalize_rows)
            msg = str(info.value)
            assert re.search(_expect(found, 5, 5), msg), msg
            assert msg.endswith("expected a floating-point tensor of shape (5, 5)"), msg


@pytest.mark.parametrize("kernel,error,found", BAD_KERNELS, ids=BAD_IDS)
def test_mmd_rejects_a_bad_kernel_result(rng, kernel, error, found):
    """mmd_loss (and its reference): each of k(s, s), k(t, t), k(s, t) must be (N, N), (M, M), (N, M)."""
    s, t = rng.randn(4, 3, dtype=F64).requires_grad_(True), rng.randn(6, 3, dtype=F64)
    for loss in (DF.mmd_loss, ref.mmd_loss_reference):
        with pytest.raises(error, match=r"^kernel <lambda> ") as info:
            loss(s, t, kernel)
        msg = str(info.value)
        assert re.search(_expect(found, 4, 4), msg), msg
        assert msg.endswith("expected a floating-point tensor of shape (4, 4)"), msg


def test_mmd_checks_the_cross_term(rng):
    """A kernel correct on square inputs but transposed on the cross term k(s, t) (M, N instead of N, M)."""
    s, t = rng.randn(4, 3, dtype=F64), rng.randn(6, 3, dtype=F64)

    def transposing(x, z):
        return (z @ x.T) if x.shape[0] != z.shape[0] else x @ z.T

    with pytest.raises(ValueError, match=r"kernel .*transposing.* returned a tensor of shape \(6, 4\) for x of 4 rows "
                                         r"and z of 6 rows; expected a floating-point tensor of shape \(4, 6\)"):
        DF.mmd_loss(s, t, transposing)


def test_parameters_bound_to_a_callable_keep_its_name(rng):
    """A callable given with keyword parameters (bound with functools.partial) is still named by its
    own __qualname__."""
    def scaled(x, z, gamma=1.0):
        return gamma * (x @ z.T).sum(1)

    s, t = rng.randn(5, 3), rng.randn(5, 2)
    with pytest.raises(ValueError, match=r"kernel .*scaled.* returned a tensor of shape \(5,\)"):
        DF.kernel_gram_loss(s, t, scaled, gamma=0.5)
    with pytest.raises(ValueError, match=r"kernel .*scaled.*"):
        DF.mmd_loss(s, rng.randn(4, 3), functools.partial(scaled, gamma=2.0))


def test_good_callable_results_pass_unchanged(rng):
    """Any floating dtype and (N, M) result passes, with the value and gradient of the unchecked formula
    (float32 kernel on float64 rows included: the check does not convert)."""
    s, t = rng.randn(5, 3, dtype=F64), rng.randn(5, 4, dtype=F64)
    for k in (laplacian, lambda a, b: laplacian(a, b).float()):
        x = s.clone().requires_grad_(True)
        loss = DF.kernel_gram_loss(x, t, k)
        want = (k(s, s).double() - k(t, t).double()).pow(2).mean()
        close(loss, want, torch.float32, rng.tag(kernel=k.__qualname__))
        loss.backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
