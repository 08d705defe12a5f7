"""distillx.functional.mmd_loss (NST): agreement with the float64 reference on fresh random inputs (every
kernel and parameter variant, N != M, N or M = 1), against independent closed forms and an oracle that
uses one kernel for all three terms, gradcheck, the detached default bandwidth, callable kernels and
argument validation."""
from __future__ import annotations

import pytest
import torch

import distillx.functional as DF
from distillx.ops import reference as ref

from .conftest import F64, close, requires_kernel
from .feature_helpers import (GRADCHECK_IDS, GRADCHECK_KERNELS, KERNEL_CASES, KERNEL_IDS, dtype_id,
                              num_threads, oracle_kernel, oracle_mmd, raw_case, raw_kernel_matrix, reference_floor,
                              run_loss, run_ref)

# (student shape, teacher shape): N rows of s, M rows of t, equal width D (extra dims are flattened).
MMD_SHAPES = [
    ((1, 3), (1, 3)),
    ((1, 2), (4, 2)),
    ((4, 5), (1, 5)),
    ((2, 1), (2, 1)),
    ((2, 7), (5, 7)),
    ((6, 4), (3, 4)),
    ((9, 5), (9, 5)),
    ((3, 2, 3), (5, 6)),
    ((13, 3), (8, 3)),
]
DTYPES = (torch.float32, F64)


def _mmd(kernel, params):
    def fn(s, t):
        return DF.mmd_loss(s, t, kernel, **params)
    return fn


def _mmd_ref(kernel, params):
    def fn(s, t):
        return ref.mmd_loss_reference(s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1), kernel, **params)
    return fn


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=KERNEL_IDS)
def test_matches_reference(rng, case, dtype):
    """Loss and gradient w.r.t. s agree with the float64 reference for every shape, under a random
    upstream gradient; output and gradient in the input dtype."""
    _, kernel, params, scale = case
    for s_shape, t_shape in MMD_SHAPES:
        s = rng.randn(*s_shape, dtype=dtype, scale=scale)
        t = rng.randn(*t_shape, dtype=dtype, scale=scale)
        up = float(rng.randn(1, dtype=F64)) + 2.0
        tag = rng.tag(kernel=kernel, params=params, dtype=dtype, s=s_shape, t=t_shape, upstream=up)
        loss, grad = run_loss(_mmd(kernel, params), s, t, upstream=up)
        want, want_grad = run_ref(_mmd_ref(kernel, params), s, t, upstream=up)
        assert loss.dtype == dtype and loss.shape == (), tag
        assert grad.dtype == dtype and grad.shape == s.shape, tag
        assert torch.isfinite(grad).all(), tag
        dl, dg = reference_floor(_mmd_ref(kernel, params), s, t, upstream=up, dtype=dtype, factor=8)
        close(loss, want, dtype, f"loss {tag}", atol_floor=dl)
        close(grad, want_grad.reshape(s.shape), dtype, f"grad {tag}", magnitude=up,
              atol_floor=dg)


# Kernels whose data-dependent defaults the oracle can reproduce with one kernel for all three terms;
# the Chebyshev default scale has its own test (test_chebyshev_default_scale_is_one_kernel).
ORACLE_CASES = [c for c in KERNEL_CASES if c[1] != "chebyshev" or "scale" in c[2]]


@pytest.mark.parametrize("case", ORACLE_CASES, ids=[c[0] for c in ORACLE_CASES])
def test_matches_oracle(rng, case):
    """mmd_loss agrees with the definition evaluated independently (cdist, chebyshev_polynomial_t; the
    rbf default sigma2 is the mean pairwise squared distance of both sets together)."""
    _, kernel, params, scale = case
    for s_shape, t_shape in MMD_SHAPES:
        s = rng.randn(*s_shape, dtype=F64, scale=scale).reshape(s_shape[0], -1)
        t = rng.randn(*t_shape, dtype=F64, scale=scale).reshape(t_shape[0], -1)
        tag = rng.tag(kernel=kernel, params=params, s=s_shape, t=t_shape)
        close(DF.mmd_loss(s, t, kernel, **params), oracle_mmd(s, t, kernel, **params), F64, tag)


def test_chebyshev_default_scale_is_one_kernel(rng):
    """The squared MMD needs ONE kernel for k(s,s'), k(t,t') and k(s,t) (else it is no distance and can be
    negative). With the default Chebyshev scale that is max|x| over both sets together — as the rbf
    default uses one sigma2 of both sets for all three terms."""
    for N, M, D, t_scale in ((6, 5, 4, 3.0), (4, 4, 3, 0.3), (5, 7, 2, 1.0)):
        s, t = rng.randn(N, D, dtype=F64), rng.randn(M, D, dtype=F64, scale=t_scale)
        for order in (1, 3):
            common = float(torch.cat([s, t]).abs().max())
            tag = rng.tag(N=N, M=M, D=D, t_scale=t_scale, order=order, common_scale=common)
            got = DF.mmd_loss(s, t, "chebyshev", order=order)
            want = DF.mmd_loss(s, t, "chebyshev", order=order, scale=common)
            close(got, oracle_mmd(s, t, "chebyshev", order=order), F64, tag)
            close(got, want, F64, tag)
            assert float(got) >= -1e-12, tag


def test_rbf_float32_features_far_from_origin(rng):
    """rbf MMD in float32 on features with a large common offset (100) and a small spread (0.1): it is
    translation-invariant, so it should stay within ~1e-3 of the float64 value on the same inputs
    (the expanded squared distances and closed-form bandwidth cancel ~7 digits unless centred)."""
    s = rng.randn(32, 8, dtype=F64, scale=0.1) + 100.0
    t = rng.randn(24, 8, dtype=F64, scale=0.1) + 100.05
    s32, t32 = s.float(), t.float()
    for params in ({}, {"sigma2": 0.04}):
        tag = rng.tag(case="offset 100, spread 0.1", params=params)
        loss, grad = run_loss(_mmd("rbf", params), s32, t32)
        want, want_grad = run_ref(_mmd_ref("rbf", params), s32, t32)
        close(loss, want, torch.float32, f"loss {tag}", rtol=1e-3, atol=0.0)
        close(grad, want_grad, torch.float32, f"grad {tag}", rtol=1e-2, atol=1e-2 * float(want_grad.abs().max()))


def test_closed_forms(rng):
    """Linear kernel: MMD² = ‖mean s − mean t‖²; polynomial of degree 1 without offset: that over D;
    the same set (permuted) has MMD 0 for every kernel; PD kernels give MMD² ≥ 0."""
    for N, M, D in ((1, 1, 3), (5, 3, 4), (2, 9, 1)):
        s, t = rng.randn(N, D, dtype=F64), rng.randn(M, D, dtype=F64, scale=1.5) + 0.2
        tag = rng.tag(N=N, M=M, D=D)
        gap = (s.mean(0) - t.mean(0)).pow(2).sum()
        close(DF.mmd_loss(s, t, "linear"), gap, F64, tag)
        close(DF.mmd_loss(s, t, "polynomial", degree=1, coef0=0.0), gap / D, F64, tag)
        # The gradient of the linear MMD: 2/N·(mean s − mean t) for every row.
        _, grad = run_loss(_mmd("linear", {}), s, t)
        close(grad, (2.0 / N * (s.mean(0) - t.mean(0))).expand(N, D), F64, tag)
        perm = s[torch.randperm(N, generator=rng.gen)]
        for _, kernel, params, scale in KERNEL_CASES:
            x = s * scale
            close(DF.mmd_loss(x, perm * scale, kernel, **params), torch.zeros((), dtype=F64), F64,
                  f"{tag} same set kernel={kernel} {params}", atol=1e-10)
        for kernel, params in (("linear", {}), ("polynomial", {}), ("polynomial", {"degree": 3}), ("rbf", {}),
                               ("rbf", {"sigma2": 0.3}), ("cosine", {})):
            assert float(DF.mmd_loss(s, t, kernel, **params)) >= -1e-12, f"{tag} kernel={kernel} {params}"


@pytest.mark.parametrize("case", GRADCHECK_KERNELS, ids=GRADCHECK_IDS)
def test_gradcheck(rng, case):
    """float64 gradcheck w.r.t. s for every kernel (fixed sigma2 / scale), N != M, N = 1."""
    _, kernel, params, scale = case
    for N, M, D in ((4, 3, 3), (1, 3, 2), (2, 5, 4)):
        s = rng.randn(N, D, dtype=F64, scale=scale).requires_grad_(True)
        t = rng.randn(M, D, dtype=F64, scale=scale)
        assert torch.autograd.gradcheck(lambda x: DF.mmd_loss(x, t, kernel, **params), (s,)), \
            rng.tag(kernel=kernel, N=N, M=M, D=D)


def test_default_bandwidth_is_detached(rng):
    """With the default rbf bandwidth (mean pairwise squared distance of both sets, detached) the gradient
    equals the reference's autograd gradient and differs from the gradient through sigma2."""
    s, t = rng.randn(6, 3, dtype=F64), rng.randn(4, 3, dtype=F64, scale=2.0)
    _, grad = run_loss(_mmd("rbf", {}), s, t)
    _, want = run_ref(_mmd_ref("rbf", {}), s, t)
    tag = rng.tag(case="rbf default bandwidth")
    close(grad, want, F64, tag)
    x = s.clone().requires_grad_(True)
    both = torch.cat([x, t])
    n = both.shape[0]
    sigma2 = torch.cdist(both, both).pow(2).sum() / (n * (n - 1))
    def k(a, b):
        return oracle_kernel(a, b, "rbf", sigma2=sigma2)
    (through,) = torch.autograd.grad(k(x, x).mean() + k(t, t).mean() - 2 * k(x, t).mean(), x)
    assert (through - grad).abs().max() > 1e-6 * max(1.0, float(grad.abs().max())), tag


def test_teacher_is_constant(rng):
    for kernel in ("rbf", "polynomial", "chebyshev", "linear", laplacian):
        s = rng.randn(5, 3).requires_grad_(True)
        t = rng.randn(7, 3).requires_grad_(True)
        DF.mmd_loss(s, t, kernel).backward()
        tag = rng.tag(kernel=kernel if isinstance(kernel, str) else "callable")
        assert t.grad is None, tag
        assert s.grad is not None and s.grad.abs().sum() > 0, tag


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_many_row_panels(rng, dtype):
    """N + M = 600 rows with small widths: several row panels of the weighted Gram sum (and 2 threads)."""
    s, t = rng.randn(350, 3, dtype=dtype), rng.randn(250, 3, dtype=dtype, scale=1.3)
    cases = [("rbf", {}), ("polynomial", {"degree": 3}), ("chebyshev", {}), ("cosine", {}), ("linear", {})]
    for kernel, params in cases:
        for threads in (1, 2):
            tag = rng.tag(kernel=kernel, dtype=dtype, threads=threads)
            with num_threads(threads):
                loss, grad = run_loss(_mmd(kernel, params), s, t, upstream=0.7)
            want, want_grad = run_ref(_mmd_ref(kernel, params), s, t, upstream=0.7)
            # float32: the three means of 10⁵ kernel values cancel to a small difference.
            rtol, atol = (None, None) if dtype == F64 else (2e-3, 2e-6)
            close(loss, want, dtype, f"loss {tag}", rtol=rtol, atol=atol)
            close(grad, want_grad, dtype, f"grad {tag}", rtol=rtol,
                  atol=None if dtype == F64 else 2e-4 * float(want_grad.abs().max()))


# ----------------------------------------------------------------------------------------------
# The raw operator distillx::kernel_mmd
# ----------------------------------------------------------------------------------------------
CODES = [0, 1, 2, 3]
CODE_IDS = ["linear", "polynomial", "rbf", "chebyshev"]


def _mmd_weights(n, m, dtype):
    return torch.cat([torch.full((n,), 1.0 / n, dtype=dtype), torch.full((m,), -1.0 / m, dtype=dtype)])


@requires_kernel
@pytest.mark.parametrize("code", CODES, ids=CODE_IDS)
def test_raw_op_panel_rows(rng, code):
    """kernel_mmd(s, t, a, …) = Σ_ij a_i a_j k(x_i, x_j), x = [s; t], with its gradient w.r.t. s (t is
    constant), for every panel height, including panels that straddle the s/t boundary; general weights
    too (not only ±1/N, ±1/M); compute_grad=False gives an empty gradient, same loss."""
    n, m = 13, 8
    for dtype in (torch.float32, F64):
        x, params, _ = raw_case(rng, code, n + m, 3, dtype)
        for weights in (_mmd_weights(n, m, dtype), rng.randn(n + m, dtype=dtype)):
            w64 = weights.to(F64)
            xs, xt = x[:n], x[n:]
            want, want_grad = run_ref(lambda v: w64 @ raw_kernel_matrix(code, torch.cat([v, xt]), params) @ w64, xs)
            for panel_rows in (0, 1, 4, n + m, 50):
                tag = rng.tag(code=code, dtype=dtype, panel_rows=panel_rows)
                loss, grad = torch.ops.distillx.kernel_mmd(xs, xt, weights, code, params, panel_rows, True)
                assert loss.dtype == dtype and loss.shape == () and grad.shape == xs.shape, tag
                close(loss, want, dtype, f"loss {tag}", magnitude=float(w64.abs().sum()) ** 2)
                close(grad, want_grad, dtype, f"grad {tag}")
                loss2, empty = torch.ops.distillx.kernel_mmd(xs, xt, weights, code, params, panel_rows, False)
                assert empty.numel() == 0 and torch.equal(loss2, loss), tag


@requires_kernel
@pytest.mark.parametrize("code", CODES, ids=CODE_IDS)
def test_opcheck_kernel_mmd(rng, code):
    for compute_grad, panel_rows, dtype in ((True, 0, torch.float32), (True, 2, F64), (False, 3, F64)):
        x, params, _ = raw_case(rng, code, 7, 3, dtype)
        xs, xt = x[:4].detach().requires_grad_(compute_grad), x[4:].detach()
        torch.library.opcheck(torch.ops.distillx.kernel_mmd.default,
                              (xs, xt, _mmd_weights(4, 3, dtype), code, params, panel_rows, compute_grad))


@requires_kernel
def test_raw_op_argument_checks(rng):
    x = rng.randn(6, 3)
    s, t = x[:4], x[4:]
    with pytest.raises(RuntimeError, match="weights"):
        torch.ops.distillx.kernel_mmd(s, t, torch.ones(5), 2, torch.tensor([0.5]), 0, True)
    with pytest.raises(RuntimeError, match="kernel code"):
        torch.ops.distillx.kernel_mmd(s, t, torch.ones(6), 7, torch.zeros(0), 0, True)
    with pytest.raises(RuntimeError, match="params"):
        torch.ops.distillx.kernel_mmd(s, t, torch.ones(6), 1, torch.zeros(2), 0, True)
    with pytest.raises(RuntimeError, match="one width"):
        torch.ops.distillx.kernel_mmd(s, rng.randn(2, 5), torch.ones(6), 0, torch.zeros(0), 0, True)


@requires_kernel
def test_compile_fullgraph(rng):
    """mmd_loss (rbf with the default bandwidth, and chebyshev) under torch.compile(fullgraph=True): loss
    and gradient equal eager and the float64 reference, also on a second call with new values."""
    def fn(s, t):
        return DF.mmd_loss(s, t, "rbf") + DF.mmd_loss(s, t, "chebyshev", order=2)

    compiled = torch.compile(fn, fullgraph=True)
    for attempt in range(2):
        s, t = rng.randn(7, 5), rng.randn(4, 5, scale=1.5)
        tag = rng.tag(case="compiled mmd_loss", attempt=attempt)
        got, got_grad = run_loss(compiled, s, t)
        want, want_grad = run_loss(fn, s, t)
        close(got, want, torch.float32, tag)
        close(got_grad, want_grad, torch.float32, tag)
        ref_loss, ref_grad = run_ref(lambda a, b: ref.mmd_loss_reference(a, b, "rbf")
                                     + ref.mmd_loss_reference(a, b, "chebyshev", order=2), s, t)
        close(got, ref_loss, torch.float32, tag, rtol=5e-4)
        close(got_grad, ref_grad, torch.float32, tag, rtol=5e-4)
        assert got_grad.abs().sum() > 0, tag


# ----------------------------------------------------------------------------------------------
# Callable (third-party) kernels
# ----------------------------------------------------------------------------------------------
def laplacian(x, z):
    return torch.exp(-torch.cdist(x, z, p=1))


def test_callable_kernel_matches_hand_computation(rng):
    for N, M, D in ((1, 1, 2), (3, 5, 4), (6, 2, 1)):
        s, t = rng.randn(N, D, dtype=F64), rng.randn(M, D, dtype=F64)
        x = s.clone().requires_grad_(True)

        def k(a, b):
            return sum(torch.exp(-(a[i] - b[j]).abs().sum()) for i in range(a.shape[0]) for j in range(b.shape[0])) \
                / (a.shape[0] * b.shape[0])
        want = k(x, x) + k(t, t) - 2 * k(x, t)
        (want_grad,) = torch.autograd.grad(want, x)
        tag = rng.tag(N=N, M=M, D=D)
        for kern in (laplacian, lambda a, b: torch.exp(-torch.cdist(a, b, p=1))):
            loss, grad = run_loss(_mmd(kern, {}), s, t)
            close(loss, want, F64, tag)
            close(grad, want_grad, F64, tag)


# ----------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------
def test_errors_name_the_argument(rng):
    s, t = rng.randn(5, 3), rng.randn(4, 3)
    with pytest.raises(ValueError, match=r"^t has width 4 but s has 3"):
        DF.mmd_loss(s, rng.randn(4, 4))
    with pytest.raises(ValueError, match=r"^t has width 6 but s has 3"):
        DF.mmd_loss(s, rng.randn(4, 2, 3))
    with pytest.raises(TypeError, match=r"^s must be a floating-point tensor"):
        DF.mmd_loss(s.int(), t)
    with pytest.raises(TypeError, match=r"^t must be a floating-point tensor"):
        DF.mmd_loss(s, t.long())
    with pytest.raises(ValueError, match=r"^t must have at least 2 dimension"):
        DF.mmd_loss(s, t[0])
    with pytest.raises(ValueError, match=r"kernel must be one of") as info:
        DF.mmd_loss(s, t, kernel="laplace")
    for name in ("linear", "polynomial", "rbf", "chebyshev", "cosine", "'laplace'"):
        assert name in str(info.value), str(info.value)
    for kernel, bad in (("polynomial", "sigma2"), ("rbf", "degree"), ("linear", "coef0")):
        with pytest.raises(ValueError, match=rf"unknown parameter\(s\) \['{bad}'\] for kernel '{kernel}'"):
            DF.mmd_loss(s, t, kernel, **{bad: 1.0})
