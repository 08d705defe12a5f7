"""Numerical edge cases of kd_loss: huge logits, -inf logits (masked vocabulary), masked and empty
batches, NaN/inf in dropped rows, degenerate rows. The cases that the pure-PyTorch fallback must
handle as well run on both backends ("compiled" and the forced "reference")."""
from __future__ import annotations

import pytest
import torch

import distillx.functional as DF
from distillx.ops import _library as dlib
from distillx.ops import logit_divergence

from .conftest import DTYPES, F64, TOL, close, reference_kd, reference_rows_safe, run_kd

NINF = float("-inf")
DIVERGENCES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]
REDUCTIONS = ("batchmean", "sum", "mean", "none")


# Dtype-parametrised tests run every dtype on the compiled kernel, and float32 on the reference.
BACKEND_DTYPES = [("compiled", d) for d in DTYPES] + [("reference", torch.float32)]
BACKEND_DTYPE_IDS = [f"{b}-{str(d).split('.')[-1]}" for b, d in BACKEND_DTYPES]


@pytest.fixture(params=["compiled", "reference"])
def backend(request, monkeypatch):
    """Which implementation serves kd_loss: the compiled kernel, or the pure-PyTorch fallback (forced).
    Afterwards it checks that this implementation, and only it, served the test's calls."""
    served = []  # one entry per kd_loss call: did the compiled kernel serve it?
    decide = logit_divergence.use_kernel
    monkeypatch.setattr(logit_divergence, "use_kernel", lambda *a: served.append(decide(*a)) or served[-1])
    if request.param == "reference":
        monkeypatch.setattr(dlib, "_KERNELS", {})
        monkeypatch.setattr(dlib, "_FALLBACK_WARNED", {("logit_divergence", "cpu")})  # no warning noise
    else:
        assert dlib.has_kernel("logit_divergence", "cpu"), "no compiled kernel to test"
    yield request.param
    assert served and all(served) == (request.param == "compiled") and any(served) == all(served), \
        f"kd_loss calls served by the compiled kernel: {served} (backend {request.param})"


def _check_rows(rng, s, t, dtype, *, temperature, divergence, beta, tag, grad_tol=None, loss_atol=None):
    """kd_loss(reduction="none") under a random upstream gradient vs the -inf/underflow-safe reference."""
    N = s.shape[0]
    v = rng.randn(N, dtype=dtype)
    kw = dict(temperature=temperature, divergence=divergence, beta=beta)
    rows, grad = run_kd(s, t, v, reduction="none", **kw)
    want_rows, want_grad = reference_rows_safe(s, t, **kw)
    want_grad = want_grad * v.to(F64)[:, None]
    assert torch.isfinite(rows).all(), f"non-finite loss {tag}: {rows}"
    assert torch.isfinite(grad).all(), f"non-finite gradient {tag}: {grad}"
    close(rows, want_rows, dtype, f"rows {tag}", magnitude=temperature**2, atol=loss_atol)
    close(grad, want_grad, dtype, f"grad {tag}", magnitude=temperature, **(grad_tol or {}))
    # Summed reduction on the same inputs.
    total, gsum = run_kd(s, t, reduction="sum", **kw)
    close(total, want_rows.sum(), dtype, f"sum {tag}", magnitude=temperature**2 * N,
          atol=None if loss_atol is None else loss_atol * N)
    return rows, grad


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[f"{d}-b{b}" for d, b in DIVERGENCES])
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=BACKEND_DTYPE_IDS, indirect=["backend"])
def test_huge_logits(rng, backend, dtype, divergence, beta):
    """Logits of magnitude ~1e4 (probabilities underflow to exactly 0 in most classes): finite loss
    and gradient, equal to the float64 reference."""
    N, C = 6, 37
    # float16 cannot hold the loss of 1e4-scale logits (row losses reach ~5e4, their sum overflows).
    scale = 1e3 if dtype == torch.float16 else 1e4
    s = rng.randn(N, C, dtype=dtype, scale=scale)
    # Teacher: independent rows, and rows close to the student (small but nonzero divergence).
    t = rng.randn(N, C, dtype=F64, scale=scale)
    t[: N // 2] = s[: N // 2].to(F64) + rng.randn(N // 2, C, dtype=F64, scale=3.0)
    t = t.to(dtype)
    for temperature in (1.0, 4.0):
        tag = rng.tag(backend=backend, dtype=dtype, divergence=divergence, beta=beta, temperature=temperature)
        # Logits x/T of size ~1e4/T carry an absolute rounding error of |x/T|·eps in the accumulation
        # type. The loss is T² times sums of differences of such numbers: a bounded loss (JSD ≤ T²·log 2)
        # can only be as exact as T·max|x|·eps. The gradient T·q·(lq − lp − KL) subtracts numbers of
        # size max|x|/T: it is exact to about max|x|·eps (times the upstream gradient).
        eps = torch.finfo(F64 if dtype == F64 else torch.float32).eps
        xmax = float(torch.maximum(s.abs().max(), t.abs().max()))
        grad_tol = dict(atol_floor=2 * xmax * eps)
        if backend == "reference":
            # The reference differentiates Σ q·(lq − lp) by autograd, where the terms q·(lq − lp) of
            # size up to max|x|/T cancel in float32: it is only good to ~1e-3 here.
            grad_tol = dict(rtol=1e-2, atol=1e-3)
        _check_rows(rng, s, t, dtype, temperature=temperature, divergence=divergence, beta=beta, tag=tag,
                    grad_tol=grad_tol, loss_atol=max(8 * temperature * xmax * eps, TOL[dtype]["atol"] * temperature**2))


@pytest.mark.parametrize("divergence,beta", DIVERGENCES + [("jsd", 0.0), ("jsd", 1.0)],
                         ids=[f"{d}-b{b}" for d, b in DIVERGENCES + [("jsd", 0.0), ("jsd", 1.0)]])
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=BACKEND_DTYPE_IDS, indirect=["backend"])
def test_masked_vocabulary(rng, backend, dtype, divergence, beta):
    """-inf on both sides in the same classes (a masked vocabulary): 0·log 0 = 0, so loss and gradient
    are those of the remaining classes, and the gradient is exactly 0 in the masked classes."""
    N, C = 5, 19
    s = rng.randn(N, C, dtype=dtype, scale=2.0)
    t = rng.randn(N, C, dtype=dtype, scale=2.0)
    vocab = rng.mask(C, keep=0.3, at_least_one=True)  # True: masked out
    vocab[0] = False  # at least one class left
    s[:, vocab] = NINF
    t[:, vocab] = NINF
    T = rng.choice([0.5, 1.0, 3.0])
    tag = rng.tag(backend=backend, dtype=dtype, divergence=divergence, beta=beta, temperature=T, vocab=vocab)
    _, grad = _check_rows(rng, s, t, dtype, temperature=T, divergence=divergence, beta=beta, tag=tag)
    assert (grad[:, vocab] == 0).all(), tag
    # Same as dropping the masked classes.
    for reduction in ("batchmean", "none"):
        a, _ = run_kd(s, t, temperature=T, divergence=divergence, beta=beta, reduction=reduction)
        b, _ = run_kd(s[:, ~vocab], t[:, ~vocab], temperature=T, divergence=divergence, beta=beta, reduction=reduction)
        close(a, b, dtype, f"{reduction} vs dropped classes {tag}", magnitude=T * T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("divergence,beta,side", [
    ("kl", 0.5, "teacher"), ("reverse_kl", 0.5, "student"), ("jsd", 0.5, "teacher"), ("jsd", 0.5, "student"),
    ("jsd", 0.2, "teacher"), ("jsd", 0.8, "student")], ids=lambda v: str(v))
def test_one_sided_neg_inf_with_zero_weight(rng, dtype, divergence, beta, side):
    """-inf on one side only, where that side's term carries no weight: teacher -inf for forward KL
    (p = 0 there, however large q is), student -inf for reverse KL (q = 0); JSD for 0 < beta < 1
    (m > 0 wherever either side is positive). Finite, and equal to the reference."""
    N, C = 4, 11
    s = rng.randn(N, C, dtype=dtype, scale=2.0)
    t = rng.randn(N, C, dtype=dtype, scale=2.0)
    holes = rng.mask(N, C, keep=0.3, at_least_one=True)
    holes[:, 0] = False  # every row keeps a finite class on both sides
    (t if side == "teacher" else s)[holes] = NINF
    tag = rng.tag(dtype=dtype, divergence=divergence, beta=beta, side=side, holes=holes)
    _, grad = _check_rows(rng, s, t, dtype, temperature=1.5, divergence=divergence, beta=beta, tag=tag)
    if side == "student":
        assert (grad[holes] == 0).all(), tag  # q = 0 there: no gradient
    elif divergence == "kl":
        assert (grad[holes] != 0).any(), tag  # T·q·v: the student is pushed away from the teacher's holes


def test_student_neg_inf_where_teacher_positive_is_infinite_forward_kl(rng):
    """Forward KL(p‖q) is +inf when the student rules out (q = 0) a class the teacher supports; by symmetry
    reverse KL is +inf when the teacher rules out a class the student supports. Only the affected rows
    are infinite; JSD stays finite (m > 0) in both situations."""
    s = rng.randn(3, 6, dtype=torch.float32)
    t = rng.randn(3, 6, dtype=torch.float32)
    s_hole, t_hole = s.clone(), t.clone()
    s_hole[1, 2] = NINF
    t_hole[2, 4] = NINF
    kl, _ = run_kd(s_hole, t, divergence="kl", reduction="none")
    assert kl[1] == float("inf") and torch.isfinite(kl[[0, 2]]).all(), kl
    assert run_kd(s_hole, t, divergence="kl")[0] == float("inf")
    rkl, _ = run_kd(s, t_hole, divergence="reverse_kl", reduction="none")
    assert rkl[2] == float("inf") and torch.isfinite(rkl[[0, 1]]).all(), rkl
    for ss, tt in ((s_hole, t), (s, t_hole)):
        jsd, grad = run_kd(ss, tt, divergence="jsd", reduction="none")
        assert torch.isfinite(jsd).all() and torch.isfinite(grad).all()
        close(jsd, reference_rows_safe(ss, tt, divergence="jsd")[0], torch.float32, rng.tag(case="jsd one-sided"))


@pytest.mark.parametrize("beta,side", [(0.0, "student"), (0.0, "teacher"), (1.0, "student"), (1.0, "teacher")],
                         ids=lambda v: str(v))
def test_jsd_beta_limits_with_one_sided_neg_inf(rng, beta, side):
    """JSD with beta 0 or 1 is identically 0 (documented), also when one side rules out classes the
    other supports: loss 0 and gradient 0, not NaN."""
    s = rng.randn(3, 7, dtype=torch.float32)
    t = rng.randn(3, 7, dtype=torch.float32)
    (s if side == "student" else t)[:, [1, 4]] = NINF
    loss, grad = run_kd(s, t, divergence="jsd", beta=beta, reduction="none")
    tag = rng.tag(beta=beta, side=side)
    assert torch.isfinite(loss).all() and loss.abs().max() < 1e-5, f"{tag}: loss {loss}"
    assert torch.isfinite(grad).all() and grad.abs().max() < 1e-5, f"{tag}: grad {grad}"


def test_jsd_with_denormal_probability_is_finite(backend):
    """One side gives a class a denormal probability (~1e-323 in float64, ~1e-45 in float32), the other
    exactly 0: m = βp + (1−β)q may round to 0 although p > 0, and p·log(p/m) must not become +inf. The
    true contribution of that class is ~p·log(1/β) ≈ 0, so every case below has JSD ≈ 0 and gradient ≈ 0."""
    failures = []
    for dtype, tiny, zero in ((F64, -744.0, -2000.0), (F64, -745.0, -2000.0),
                              (torch.float32, -103.5, -300.0), (torch.float32, -104.0, -300.0)):
        for beta in (0.2, 0.5, 0.8):
            for s_row, t_row in (([0.0, zero], [0.0, tiny]), ([0.0, tiny], [0.0, zero])):
                s = torch.tensor([s_row], dtype=dtype)
                t = torch.tensor([t_row], dtype=dtype)
                loss, grad = run_kd(s, t, divergence="jsd", beta=beta)
                if not (torch.isfinite(loss) and abs(float(loss)) < 1e-6
                        and torch.isfinite(grad).all() and grad.abs().max() < 1e-6):
                    failures.append(f"{str(dtype)[6:]} student={s_row} teacher={t_row} beta={beta}: "
                                    f"loss={float(loss)} grad={grad.tolist()}")
    assert not failures, f"backend={backend}, expected loss ~0 and gradient ~0:\n" + "\n".join(failures)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[f"{d}-b{b}" for d, b in DIVERGENCES])
def test_row_without_distribution_contributes_zero(rng, backend, divergence, beta):
    """A row whose student or teacher logits are all -inf has no distribution: it contributes 0 to the
    loss and gets no gradient (documented); the other rows are unaffected."""
    s = rng.randn(4, 5, dtype=torch.float32)
    t = rng.randn(4, 5, dtype=torch.float32)
    s[1] = NINF
    t[2] = NINF
    rows, grad = run_kd(s, t, divergence=divergence, beta=beta, reduction="none")
    tag = rng.tag(backend=backend, divergence=divergence, beta=beta)
    assert rows[1] == 0 and rows[2] == 0, f"{tag}: {rows}"
    if backend == "compiled":  # the reference's gradient through an all -inf row is NaN (where-gradient)
        assert (grad[1:3] == 0).all(), f"{tag}: {grad}"
    keep = torch.tensor([0, 3])
    want, want_grad = reference_kd(s[keep], t[keep], divergence=divergence, beta=beta, reduction="none")
    close(rows[keep], want, torch.float32, tag)
    close(grad[keep], want_grad, torch.float32, tag)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[f"{d}-b{b}" for d, b in DIVERGENCES])
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=BACKEND_DTYPE_IDS, indirect=["backend"])
def test_all_rows_masked_is_exactly_zero(rng, backend, dtype, divergence, beta):
    s = rng.randn(2, 3, 9, dtype=dtype)
    t = rng.randn(2, 3, 9, dtype=dtype)
    s[0, 1] = float("nan")  # garbage in dropped rows changes nothing
    t[1, 2, 3] = float("inf")
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for reduction in REDUCTIONS:
        up = rng.randn(2, 3, dtype=dtype) if reduction == "none" else None
        loss, grad = run_kd(s, t, up, divergence=divergence, beta=beta, reduction=reduction, mask=mask)
        tag = rng.tag(backend=backend, dtype=dtype, divergence=divergence, reduction=reduction)
        assert loss.shape == ((2, 3) if reduction == "none" else ()), tag
        assert not torch.isnan(loss).any() and (loss == 0).all(), f"{tag}: {loss}"
        assert not torch.isnan(grad).any() and (grad == 0).all(), f"{tag}: {grad}"


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[f"{d}-b{b}" for d, b in DIVERGENCES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d).split(".")[-1])
def test_masked_rows_with_nan_and_inf_do_not_leak(rng, backend, dtype, divergence, beta):
    N, C = 6, 10
    s = rng.randn(N, C, dtype=dtype)
    t = rng.randn(N, C, dtype=dtype)
    mask = torch.tensor([True, False, True, False, True, False])
    s[1] = float("nan")
    t[3] = float("nan")
    s[5, ::2] = float("inf")
    t[5, 1::2] = NINF
    t[1, 0] = float("inf")
    for reduction in REDUCTIONS:
        up = rng.randn(N, dtype=dtype) if reduction == "none" else None
        loss, grad = run_kd(s, t, up, divergence=divergence, beta=beta, reduction=reduction, mask=mask)
        tag = rng.tag(backend=backend, dtype=dtype, divergence=divergence, reduction=reduction)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), f"{tag}\n{loss}\n{grad}"
        assert (grad[~mask] == 0).all(), tag
        if reduction == "none":
            assert (loss[~mask] == 0).all(), tag
        # Equal to computing on the kept rows, with the mask-normalised reductions.
        s_ok, t_ok = s.clone(), t.clone()
        s_ok[~mask] = 0
        t_ok[~mask] = 0
        want, want_grad = reference_kd(s_ok, t_ok, up, divergence=divergence, beta=beta, reduction=reduction,
                                       mask=mask)
        close(loss, want, dtype, tag, magnitude=N if reduction == "sum" else 1)
        close(grad, want_grad, dtype, tag)


@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 5), (0, 1)], ids=str)
def test_empty_batch(backend, shape):
    for divergence in ("kl", "reverse_kl", "jsd"):
        for reduction in REDUCTIONS:
            s = torch.randn(shape, requires_grad=True)
            t = torch.randn(shape)
            mask = torch.ones(shape[:-1], dtype=torch.bool)
            for m in (None, mask):
                loss = DF.kd_loss(s, t, divergence=divergence, reduction=reduction, mask=m)
                if reduction == "none":
                    assert loss.shape == shape[:-1]
                else:
                    assert loss.shape == () and loss.item() == 0.0, (divergence, reduction, loss)
                loss.sum().backward()
                assert s.grad.shape == shape


def test_single_class_is_zero(rng):
    for dtype in DTYPES:
        s = rng.randn(4, 1, dtype=dtype, scale=5.0)
        t = rng.randn(4, 1, dtype=dtype, scale=5.0)
        for divergence, beta in DIVERGENCES:
            loss, grad = run_kd(s, t, divergence=divergence, beta=beta, reduction="sum", temperature=2.0)
            tag = rng.tag(dtype=dtype, divergence=divergence)
            assert loss.abs() < 1e-5 and grad.abs().max() < 1e-5, f"{tag}: {loss} {grad}"


@pytest.mark.parametrize("side,divergence", [(side, d) for side in ("student", "teacher")
                                              for d in ("kl", "reverse_kl", "jsd")], ids=lambda v: str(v))
def test_nonfinite_logit_in_a_kept_row_is_not_hidden(rng, backend, side, divergence):
    """NaN or +inf in a row that is kept (a diverged or fp16-overflowed model) must surface: that row's
    loss is not finite, and for a corrupted student the row's gradient is not finite either (what
    torch.amp.GradScaler and NaN guards look for). Silently returning 0 hides the problem.
    Rows without garbage stay finite."""
    for value in (float("nan"), float("inf")):
        s = rng.randn(3, 8)
        t = rng.randn(3, 8)
        (s if side == "student" else t)[1, 3] = value
        rows, grad = run_kd(s, t, divergence=divergence, beta=0.5, reduction="none")
        tag = rng.tag(backend=backend, side=side, value=value, divergence=divergence)
        assert torch.isfinite(rows[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all(), tag
        assert not torch.isfinite(rows[1]), f"{tag}: row loss {rows.tolist()} hides the {value}"
        if side == "student":
            assert not torch.isfinite(grad[1]).all(), f"{tag}: row gradient {grad[1].tolist()} hides the {value}"


@pytest.mark.parametrize("temperature", [1e-3, 0.05, 20.0, 1e3])
def test_extreme_temperatures(rng, temperature):
    s = rng.randn(5, 13, dtype=torch.float32, scale=3.0)
    t = rng.randn(5, 13, dtype=torch.float32, scale=3.0)
    # Below T = 1 float32 cannot hold the scaled logits x/T better than eps·|x|/T, and the gradient
    # inherits that relative error (reverse KL's q·(log q − log p) most): at T = 1e-3 about 1e-3,
    # past float32's usual rtol (a failure in ~0.3% of seeds before this bound).
    cond = torch.finfo(torch.float32).eps * float(torch.maximum(s.abs().max(), t.abs().max())) / temperature
    grad_tol = dict(rtol=max(TOL[torch.float32]["rtol"], 4 * cond)) if temperature < 1 else None
    for divergence, beta in DIVERGENCES:
        tag = rng.tag(temperature=temperature, divergence=divergence)
        _check_rows(rng, s, t, torch.float32, temperature=temperature, divergence=divergence, beta=beta, tag=tag,
                    grad_tol=grad_tol)


def test_parallel_rows_match_reference(rng):
    """Enough rows for the CPU kernel to split them over several tasks/threads."""
    s = rng.randn(48, 1031, dtype=torch.float32, scale=2.0)
    t = rng.randn(48, 1031, dtype=torch.float32, scale=2.0)
    m = rng.mask(48)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for divergence, beta in (("kl", 0.5), ("jsd", 0.3)):
            kw = dict(divergence=divergence, beta=beta, temperature=2.0, mask=m, reduction="sum")
            loss, grad = run_kd(s, t, **kw)
            want, want_grad = reference_kd(s, t, **kw)
            tag = rng.tag(**kw)
            close(loss, want, torch.float32, tag, magnitude=4 * 48)
            close(grad, want_grad, torch.float32, tag, magnitude=2.0)
    finally:
        torch.set_num_threads(before)
