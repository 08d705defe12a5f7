"""Shared helpers of the op tests: fresh random inputs with a recorded seed, and float64 reference oracles.

Every test that draws inputs takes the ``rng`` fixture. Its seed is random per test (fresh inputs on
every run) unless ``DISTILLX_TEST_SEED`` is set; the seed is part of every assertion message made
through :func:`close` and is appended to the report of any failing test, so a failure reproduces with
``DISTILLX_TEST_SEED=<seed> pytest '<node id>'``.
"""
from __future__ import annotations

import os
import secrets

import pytest
import torch

import distillx  # noqa: F401  (loads distillx._C, registering the distillx::* ops)
import distillx.functional as DF
from distillx import _ext
from distillx.ops import reference as ref

SEED_ENV = "DISTILLX_TEST_SEED"
F64 = torch.float64
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
HALF = (torch.bfloat16, torch.float16)

# Tolerances against a float64 reference evaluated on the very same (rounded) input values. The
# kernel's only errors are float32 accumulation (exp_u20) and rounding of its outputs to the input
# dtype (twice for gradients: the kernel's gradient, then its scaling by the upstream gradient).
# atol is relative to the largest expected magnitude, so it scales with the quantity compared.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=5e-5, atol=5e-6),
    torch.float16: dict(rtol=4e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2.5e-2, atol=1.5e-2),
}

requires_kernel = pytest.mark.skipif(not _ext.available(), reason="distillx._C not built")


class Rng:
    """A per-test torch.Generator; draws in float64 and rounds to the requested dtype."""

    def __init__(self, seed: int):
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=self.gen, dtype=F64) * scale).to(dtype)

    def rand(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen, dtype=F64).to(dtype)

    def mask(self, *shape, keep=0.6, at_least_one=True) -> torch.Tensor:
        m = torch.rand(shape, generator=self.gen) < keep
        if at_least_one and m.numel() and not m.any():
            m.view(-1)[int(torch.randint(m.numel(), (1,), generator=self.gen))] = True
        return m

    def choice(self, seq):
        return seq[int(torch.randint(len(seq), (1,), generator=self.gen))]

    def tag(self, **case) -> str:
        params = ", ".join(f"{k}={_short(v)}" for k, v in case.items())
        return f"[{SEED_ENV}={self.seed}] {params}"


@pytest.fixture(autouse=True, scope="package")
def _one_intra_op_thread():
    """These tests use tiny tensors, where intra-op threads only add synchronisation: on a machine whose
    cores are busy, OpenMP hand-offs made this package ~6x slower. One thread for the package (restored
    afterwards); test_parallel_rows_match_reference runs the kernel's multi-threaded path explicitly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _short(v):
    if isinstance(v, torch.Tensor):
        if v.numel() <= 16:
            return f"tensor({v.tolist()})"
        return f"tensor(shape={tuple(v.shape)}, dtype={v.dtype})"
    return repr(v) if isinstance(v, str) else str(v)


@pytest.fixture
def rng(request) -> Rng:
    env = os.environ.get(SEED_ENV)
    seed = int(env) if env else secrets.randbits(31)
    request.node._distillx_seed = seed
    return Rng(seed)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed = getattr(item, "_distillx_seed", None)
    if seed is not None and report.failed:
        report.sections.append(("distillx seed", f"reproduce with: {SEED_ENV}={seed} pytest '{item.nodeid}'"))
    return report


def close(actual, expected, dtype, msg, *, magnitude=1.0, rtol=None, atol=None, atol_floor=0.0):
    """assert_close against a float64 expectation with the tolerance of ``dtype``; ``msg`` names the case.

    The dtype's atol is scaled by the largest finite expected magnitude (at least ``magnitude``): a loss
    that sums n rows of T²·D has roundoff ~ n·T²·eps even when its value is 0 (JSD with beta 0). An
    explicit ``atol`` is used as is; ``atol_floor`` is a lower bound for the scaled one."""
    tol = dict(TOL[dtype])
    expected = expected.detach().to(F64)
    actual = actual.detach().to(F64)
    finite = expected[torch.isfinite(expected)]
    biggest = float(finite.abs().max()) if finite.numel() else 0.0
    tol["atol"] = max(tol["atol"] * max(float(magnitude), 1.0, biggest), atol_floor) if atol is None else atol
    if rtol is not None:
        tol["rtol"] = rtol
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{msg}\n{m}")


# ----------------------------------------------------------------------------------------------
# Runners: distillx under test, and the float64 reference oracle on the same values.
# ----------------------------------------------------------------------------------------------
def run_kd(s, t, upstream=None, **kw):
    """kd_loss on a fresh leaf copy of ``s``; returns (loss, grad w.r.t. s) after out.backward(upstream)."""
    s = s.detach().clone().requires_grad_(True)
    out = DF.kd_loss(s, t, **kw)
    g = torch.ones_like(out) if upstream is None else upstream.to(out.dtype).reshape(out.shape)
    out.backward(g)
    return out.detach(), s.grad


def reference_kd(s, t, upstream=None, *, temperature=1.0, divergence="kl", beta=0.5, reduction="batchmean",
                 mask=None):
    """The pure-PyTorch reference in float64 on the values kd_loss sees (teacher converted to the
    student's dtype first, as kd_loss does); returns (loss, grad w.r.t. s), both float64."""
    s64 = s.detach().to(F64).requires_grad_(True)
    t64 = t.detach().to(s.dtype).to(F64)
    m = None if mask is None else mask.reshape(-1)
    out = ref.kd_loss_reference(s64, t64, temperature, divergence, beta, reduction, m)
    g = torch.ones_like(out) if upstream is None else upstream.to(s.dtype).to(F64).reshape(out.shape)
    (grad,) = torch.autograd.grad(out, s64, g)
    return out.detach(), grad


def reference_rows_safe(s, t, *, temperature=1.0, divergence="kl", beta=0.5):
    """Per-row reference in float64 that tolerates -inf and underflow: per row, columns where both
    float64 probabilities are below 1e-200 are dropped (they contribute < 1e-190 to loss and gradient;
    the reference's where-gradient would turn their 0·(-inf) into NaN), remaining -inf logits become
    -1e30 (probability exactly 0). Returns (rows (N,), grad (N,C)), gradient 0 in dropped columns."""
    s64 = s.detach().to(F64)
    t64 = t.detach().to(s.dtype).to(F64)
    N, C = s64.shape
    rows = torch.zeros(N, dtype=F64)
    grad = torch.zeros(N, C, dtype=F64)
    for i in range(N):
        si, ti = s64[i], t64[i]
        if torch.isneginf(si).all() or torch.isneginf(ti).all():
            continue  # no distribution: the row contributes 0 (documented)
        q = torch.softmax(si / temperature, -1)
        p = torch.softmax(ti / temperature, -1)
        # Not "> 0": near the denormal limit m = βp + (1−β)q can round to 0 while p > 0.
        keep = (p > 1e-200) | (q > 1e-200)
        xs = si[keep].clamp(min=-1e30).requires_grad_(True)
        xt = ti[keep].clamp(min=-1e30)
        r = ref.divergence_rows(xs[None], xt[None], temperature, divergence, beta)[0]
        (g,) = torch.autograd.grad(r, xs)
        rows[i] = r.detach()
        grad[i, keep] = g
    return rows, grad


def linear_logits(hs, ws, bs, ht, wt, bt):
    """The logits linear_kd_loss distils, in float64, with the teacher side computed the way
    linear_kd_loss does it (in the teacher weight's dtype, then converted to the student's dtype).
    Student inputs are returned as float64 leaves (hs64, ws64, bs64) to differentiate through."""
    dtype = hs.dtype
    hs64 = hs.detach().to(F64).requires_grad_(True)
    ws64 = ws.detach().to(dtype).to(F64).requires_grad_(True)
    bs64 = None if bs is None else bs.detach().to(dtype).to(F64).requires_grad_(True)
    tw = wt.dtype
    with torch.no_grad():
        lt = torch.nn.functional.linear(ht.detach().to(tw), wt.detach(), None if bt is None else bt.detach().to(tw))
        lt = lt.to(dtype).to(F64)
    ls = torch.nn.functional.linear(hs64, ws64, bs64)
    return (hs64, ws64, bs64), ls, lt


def run_linear(hs, ws, bs, ht, wt, bt, upstream=None, **kw):
    """linear_kd_loss on fresh leaf copies of the student side; returns (loss, (g_hs, g_ws, g_bs))."""
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in (hs, ws, bs)]
    out = DF.linear_kd_loss(leaves[0], leaves[1], ht, wt, leaves[2], bt, **kw)
    g = torch.ones_like(out) if upstream is None else upstream.to(out.dtype).reshape(out.shape)
    out.backward(g)
    return out.detach(), tuple(None if x is None else x.grad for x in leaves)


def reference_linear(hs, ws, bs, ht, wt, bt, upstream=None, *, temperature=1.0, divergence="kl", beta=0.5,
                     reduction="batchmean", mask=None, chunk_size=None, model_rounding=False):
    """float64 reference of linear_kd_loss on the values it sees; returns (loss, (g_hs, g_ws, g_bs)).

    ``model_rounding``: also round what the kernel keeps in the student dtype — the logits chunk (its
    value; the gradient passes straight through) and the logits gradient it overwrites them with —
    so the difference to the plain reference measures the error a correct kernel must have."""
    (hs64, ws64, bs64), ls, lt = linear_logits(hs, ws, bs, ht, wt, bt)
    if model_rounding:
        dtype = hs.dtype
        ls = ls + (ls.detach().to(dtype).to(F64) - ls.detach())
        ls.register_hook(lambda g: g.to(dtype).to(F64))
    m = None if mask is None else mask.reshape(-1)
    out = ref.kd_loss_reference(ls, lt, temperature, divergence, beta, reduction, m)
    g = torch.ones_like(out) if upstream is None else upstream.to(hs.dtype).to(F64).reshape(out.shape)
    leaves = [x for x in (hs64, ws64, bs64) if x is not None]
    grads = list(torch.autograd.grad(out, leaves, g))
    return out.detach(), (grads[0], grads[1], grads[2] if bs64 is not None else None)
