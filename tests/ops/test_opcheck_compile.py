"""The raw operators torch.ops.distillx.logit_divergence / linear_divergence: torch.library.opcheck,
semantics of their row weights and gradient outputs, gradcheck of the recompute path, their own argument
checks, and torch.compile(fullgraph=True) over kd_loss / linear_kd_loss."""
from __future__ import annotations

import pytest
import torch

import distillx.functional as DF
from distillx.ops import DIVERGENCE_CODES
from distillx.ops import reference as ref

from .conftest import F64, close, requires_kernel

pytestmark = requires_kernel

CODES = list(DIVERGENCE_CODES.items())


def _logit_op():
    return torch.ops.distillx.logit_divergence


def _linear_op():
    return torch.ops.distillx.linear_divergence


# ----------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence,code", CODES, ids=[c[0] for c in CODES])
@pytest.mark.parametrize("with_weight", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("compute_grad", [True, False], ids=["grad", "nograd"])
def test_opcheck_logit_divergence(rng, compute_grad, with_weight, divergence, code):
    dtype = {"kl": torch.float32, "reverse_kl": F64, "jsd": torch.bfloat16}[divergence]
    s = rng.randn(5, 13, dtype=dtype).requires_grad_(True)
    t = rng.randn(5, 13, dtype=dtype)
    acc = F64 if dtype == F64 else torch.float32
    w = rng.rand(5, dtype=acc) * (rng.mask(5)).to(acc) if with_weight else None
    torch.library.opcheck(_logit_op(), (s, t, w, 1.7, code, 0.3, compute_grad))


LINEAR_CASES = {
    # name: (student bias, teacher bias, row weight, chunk_size, teacher dtype)
    "nobias": (False, False, False, 2, torch.float32),
    "sbias-weight": (True, False, True, 0, torch.float32),
    "tbias": (False, True, False, 3, torch.float32),
    "both-weight-teacher64": (True, True, True, 4, F64),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES), ids=list(LINEAR_CASES))
@pytest.mark.parametrize("compute_grad", [True, False], ids=["grad", "nograd"])
def test_opcheck_linear_divergence(rng, compute_grad, case):
    s_bias, t_bias, weight, chunk, tdtype = LINEAR_CASES[case]
    hs = rng.randn(6, 4).requires_grad_(True)
    ws = rng.randn(9, 4).requires_grad_(True)
    bs = rng.randn(9).requires_grad_(True) if s_bias else None
    ht, wt = rng.randn(6, 3, dtype=tdtype), rng.randn(9, 3, dtype=tdtype)
    bt = rng.randn(9, dtype=tdtype) if t_bias else None
    w = rng.rand(6) * rng.mask(6).float() if weight else None
    code = rng.choice([0, 1, 2])
    torch.library.opcheck(_linear_op(), (hs, ws, bs, ht, wt, bt, w, 2.0, code, 0.4, chunk, compute_grad))


# ----------------------------------------------------------------------------------------------
# Semantics of the raw ops
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16, torch.float16], ids=str)
def test_logit_divergence_outputs(rng, dtype):
    """rows_i = w_i·T²·D_i in the accumulation dtype; grad_i = w_i·∂(T²·D_i)/∂s_i in the input dtype;
    with compute_grad False the gradient output is empty."""
    s, t = rng.randn(6, 9, dtype=dtype), rng.randn(6, 9, dtype=dtype)
    w = rng.rand(6, dtype=F64) * 3
    w[2] = 0
    acc = F64 if dtype == F64 else torch.float32
    for name, code in CODES:
        rows, grad = _logit_op()(s, t, w.to(acc), 2.0, code, 0.3, True)
        assert rows.dtype == acc and rows.shape == (6,) and grad.dtype == dtype and grad.shape == s.shape
        s64 = s.to(F64).requires_grad_(True)
        want = ref.divergence_rows(s64, t.to(F64), 2.0, name, 0.3) * w
        (want_grad,) = torch.autograd.grad(want.sum(), s64)
        tag = rng.tag(dtype=dtype, divergence=name)
        close(rows, want.detach(), dtype, tag, magnitude=4.0)
        close(grad, want_grad, dtype, tag, magnitude=2.0)
        assert (grad[2] == 0).all() and rows[2] == 0, tag
        rows2, empty = _logit_op()(s, t, w.to(acc), 2.0, code, 0.3, False)
        assert empty.numel() == 0, tag
        assert torch.equal(rows, rows2), tag
        # No row weight means weight 1.
        rows3, grad3 = _logit_op()(s, t, None, 2.0, code, 0.3, True)
        _, grad1 = _logit_op()(s, t, torch.ones(6, dtype=acc), 2.0, code, 0.3, True)
        assert torch.equal(grad3, grad1), tag
        close(rows3 * w.to(acc), rows, dtype, tag, magnitude=4.0)


def test_logit_divergence_does_not_modify_inputs(rng):
    s, t = rng.randn(4, 11), rng.randn(4, 11)
    s0, t0 = s.clone(), t.clone()
    for _, code in CODES:
        _logit_op()(s, t, None, 1.0, code, 0.5, True)
        _linear_op()(rng.randn(4, 3), rng.randn(11, 3), None, rng.randn(4, 2), rng.randn(11, 2), None, None,
                     1.0, code, 0.5, 2, True)
    assert torch.equal(s, s0) and torch.equal(t, t0)


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_linear_divergence_outputs(rng, with_bias):
    """total = Σ rows; rows_i = w_i·T²·D_i; the three gradients are those of total w.r.t. hidden, weight,
    bias (empty without a bias, or with compute_grad False); every chunk_size (0 = automatic) agrees."""
    N, H, C = 7, 5, 12
    hs, ws = rng.randn(N, H, dtype=F64), rng.randn(C, H, dtype=F64)
    bs = rng.randn(C, dtype=F64) if with_bias else None
    ht, wt, bt = rng.randn(N, 3, dtype=F64), rng.randn(C, 3, dtype=F64), rng.randn(C, dtype=F64)
    w = rng.rand(N, dtype=F64)
    w[1] = 0
    for name, code in CODES:
        leaves = [x.clone().requires_grad_(True) for x in (hs, ws)] + ([bs.clone().requires_grad_(True)] if with_bias else [])
        logits = torch.nn.functional.linear(leaves[0], leaves[1], leaves[2] if with_bias else None)
        want_rows = ref.divergence_rows(logits, torch.nn.functional.linear(ht, wt, bt), 1.5, name, 0.6) * w
        want_grads = torch.autograd.grad(want_rows.sum(), leaves)
        for chunk in (0, 1, 3, N, 100):
            tag = rng.tag(divergence=name, chunk=chunk, bias=with_bias)
            total, rows, g_h, g_w, g_b = _linear_op()(hs, ws, bs, ht, wt, bt, w, 1.5, code, 0.6, chunk, True)
            close(rows, want_rows.detach(), F64, tag)
            close(total, want_rows.sum().detach(), F64, tag)
            close(g_h, want_grads[0], F64, tag)
            close(g_w, want_grads[1], F64, tag)
            if with_bias:
                close(g_b, want_grads[2], F64, tag)
            else:
                assert g_b.numel() == 0, tag
            _, rows2, *empty = _linear_op()(hs, ws, bs, ht, wt, bt, w, 1.5, code, 0.6, chunk, False)
            assert all(e.numel() == 0 for e in empty), tag
            close(rows2, rows, F64, tag, atol=1e-13)


@pytest.mark.parametrize("compute_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("with_weight", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("divergence,code", CODES, ids=[c[0] for c in CODES])
def test_gradcheck_logit_divergence_raw(rng, divergence, code, with_weight, compute_grad):
    """torch.autograd.gradcheck of the raw op's row losses. With compute_grad True backward scales the
    gradient saved by forward; with compute_grad False it calls the kernel again with the upstream
    gradient folded into the row weights."""
    s, t = rng.randn(3, 5, dtype=F64, scale=1.5).requires_grad_(True), rng.randn(3, 5, dtype=F64, scale=1.5)
    w = torch.tensor([0.5, 0.0, 2.0], dtype=F64) if with_weight else None
    assert torch.autograd.gradcheck(lambda x: _logit_op()(x, t, w, 1.3, code, 0.35, compute_grad)[0], (s,)), \
        rng.tag(divergence=divergence)


@pytest.mark.parametrize("compute_grad", [True, False], ids=["grad", "nograd"])
def test_gradcheck_linear_divergence_raw(rng, compute_grad):
    hs, ws, bs = (rng.randn(4, 3, dtype=F64).requires_grad_(True), rng.randn(6, 3, dtype=F64).requires_grad_(True),
                  rng.randn(6, dtype=F64).requires_grad_(True))
    ht, wt = rng.randn(4, 2, dtype=F64), rng.randn(6, 2, dtype=F64)
    w = torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=F64)
    for _, code in CODES:
        assert torch.autograd.gradcheck(
            lambda h, a, b: tuple(_linear_op()(h, a, b, ht, wt, None, w, 1.2, code, 0.3, 3, compute_grad)[:2]),
            (hs, ws, bs)), rng.tag(code=code)


BAD_RAW = [
    ("dtype", lambda: _logit_op()(torch.randn(3, 4), torch.randn(3, 4, dtype=F64), None, 1.0, 0, 0.5, False),
     "dtypes differ"),
    ("shape", lambda: _logit_op()(torch.randn(3, 4), torch.randn(3, 5), None, 1.0, 0, 0.5, False), "same shape"),
    ("1d", lambda: _logit_op()(torch.randn(4), torch.randn(4), None, 1.0, 0, 0.5, False), "student must be 2-D"),
    ("int", lambda: _logit_op()(torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long), None, 1.0, 0,
                                0.5, False), "student must be a floating-point"),
    ("row_weight", lambda: _logit_op()(torch.randn(3, 4), torch.randn(3, 4), torch.ones(2), 1.0, 0, 0.5, False),
     "row_weight must have shape"),
    ("code", lambda: _logit_op()(torch.randn(3, 4), torch.randn(3, 4), None, 1.0, 3, 0.5, False), "divergence code"),
    ("temperature", lambda: _logit_op()(torch.randn(3, 4), torch.randn(3, 4), None, 0.0, 0, 0.5, False),
     "temperature must be > 0"),
    ("beta", lambda: _logit_op()(torch.randn(3, 4), torch.randn(3, 4), None, 1.0, 2, 1.5, False), "beta must be in"),
    ("lin-width", lambda: _linear_op()(torch.randn(3, 4), torch.randn(5, 3), None, torch.randn(3, 2), torch.randn(5, 2),
                                       None, None, 1.0, 0, 0.5, 0, False), "student_weight must have shape"),
    ("lin-classes", lambda: _linear_op()(torch.randn(3, 4), torch.randn(5, 4), None, torch.randn(3, 2),
                                         torch.randn(6, 2), None, None, 1.0, 0, 0.5, 0, False), "teacher_weight must have"),
    ("lin-rows", lambda: _linear_op()(torch.randn(3, 4), torch.randn(5, 4), None, torch.randn(2, 2), torch.randn(5, 2),
                                      None, None, 1.0, 0, 0.5, 0, False), "teacher_hidden must have 3 rows"),
    ("lin-bias", lambda: _linear_op()(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4), torch.randn(3, 2),
                                      torch.randn(5, 2), None, None, 1.0, 0, 0.5, 0, False), "student_bias must be"),
    ("lin-dtype", lambda: _linear_op()(torch.randn(3, 4), torch.randn(5, 4, dtype=F64), None, torch.randn(3, 2),
                                       torch.randn(5, 2), None, None, 1.0, 0, 0.5, 0, False), "student_weight dtype"),
]


@pytest.mark.parametrize("call,match", [c[1:] for c in BAD_RAW], ids=[c[0] for c in BAD_RAW])
def test_raw_op_argument_checks(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ----------------------------------------------------------------------------------------------
def _grads(fn, leaves, *rest):
    leaves = [x.detach().clone().requires_grad_(True) for x in leaves]
    out = fn(*leaves, *rest)
    return out.detach(), torch.autograd.grad(out, leaves)


def test_compile_kd_loss_fullgraph(rng):
    def fn(s, t, mask):
        a = DF.kd_loss(s, t, temperature=2.0, divergence="jsd", beta=0.3, mask=mask)
        b = DF.kd_loss(s, t, divergence="reverse_kl", reduction="none")
        return a + (b * b.detach()).mean()  # a per-row upstream gradient for the "none" output

    s, t = rng.randn(3, 5, 17), rng.randn(3, 5, 17)
    mask = rng.mask(3, 5)
    compiled = torch.compile(fn, fullgraph=True)
    got, got_grads = _grads(compiled, [s], t, mask)
    want, want_grads = _grads(fn, [s], t, mask)
    tag = rng.tag(case="compiled kd_loss")
    close(got, want, torch.float32, tag)
    close(got_grads[0], want_grads[0], torch.float32, tag)
    # Against the float64 reference too (both could be wrong the same way otherwise).
    s64 = s.double().requires_grad_(True)
    ref_out = (ref.kd_loss_reference(s64, t.double(), 2.0, "jsd", 0.3, "batchmean", mask.reshape(-1))
               + (lambda r: (r * r.detach()).mean())(ref.kd_loss_reference(s64, t.double(), 1.0, "reverse_kl", 0.5,
                                                                           "none")))
    (ref_grad,) = torch.autograd.grad(ref_out, s64)
    close(got, ref_out, torch.float32, tag)
    close(got_grads[0], ref_grad, torch.float32, tag)
    # A second call with new values reuses the graph and is still right.
    s2 = rng.randn(3, 5, 17)
    got2, got2_grads = _grads(compiled, [s2], t, mask)
    want2, want2_grads = _grads(fn, [s2], t, mask)
    close(got2, want2, torch.float32, tag)
    close(got2_grads[0], want2_grads[0], torch.float32, tag)


def test_compile_linear_kd_loss_fullgraph(rng):
    def fn(hs, ws, bs, ht, wt, bt, mask):
        a = DF.linear_kd_loss(hs, ws, ht, wt, bs, bt, temperature=2.0, divergence="reverse_kl", reduction="mean",
                              mask=mask, chunk_size=3)
        b = DF.linear_kd_loss(hs, ws, ht, wt, bs, None, divergence="jsd", reduction="none", chunk_size=4)
        return a + (b * b.detach()).sum()

    hs, ws, bs = rng.randn(2, 4, 6), rng.randn(19, 6, scale=0.5), rng.randn(19)
    ht, wt, bt = rng.randn(2, 4, 5), rng.randn(19, 5, scale=0.5), rng.randn(19)
    mask = rng.mask(2, 4)
    compiled = torch.compile(fn, fullgraph=True)
    got, got_grads = _grads(compiled, [hs, ws, bs], ht, wt, bt, mask)
    want, want_grads = _grads(fn, [hs, ws, bs], ht, wt, bt, mask)
    tag = rng.tag(case="compiled linear_kd_loss")
    close(got, want, torch.float32, tag)
    for g, w in zip(got_grads, want_grads):
        close(g, w, torch.float32, tag)
    assert all(g.abs().sum() > 0 for g in got_grads), tag
