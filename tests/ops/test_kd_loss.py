"""distillx.functional.kd_loss: agreement with the float64 reference on fresh random inputs, gradients,
dtypes, autograd behaviour, the reference fallback and argument validation."""
from __future__ import annotations

import warnings

import pytest
import torch

import distillx.functional as DF
from distillx.ops import _library as dlib
from distillx import _ext
from distillx.ops import reference as ref

from .conftest import DTYPES, F64, close, reference_kd, run_kd

DIVERGENCE_CASES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 1.0)]
REDUCTIONS = ("batchmean", "sum", "mean", "none")
# (shape, temperature): one row, one class, C not a multiple of any vector width, leading dims, 1-D input.
SHAPES = [
    ((1, 1), 1.0),
    ((1, 7), 2.0),
    ((5, 1), 0.5),
    ((3, 3), 1.0),
    ((4, 17), 4.0),
    ((2, 3, 33), 2.0),
    ((3, 1031), 1.0),
    ((9,), 0.7),
]


def _ids(case):
    return f"{case[0]}-b{case[1]}"


@pytest.mark.parametrize("shape,temperature", SHAPES, ids=[f"{'x'.join(map(str, s))}-T{t}" for s, t in SHAPES])
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=map(_ids, DIVERGENCE_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_matches_reference(rng, dtype, divergence, beta, shape, temperature):
    """Loss and gradient w.r.t. the student agree with the float64 reference for every reduction, with
    and without a row mask (of the leading shape or flattened), under a random upstream gradient."""
    s = rng.randn(*shape, dtype=dtype, scale=2.0)
    t = rng.randn(*shape, dtype=dtype, scale=2.0)
    rows_shape = shape[:-1]
    n = 1
    for d in rows_shape:
        n *= d
    for reduction in REDUCTIONS:
        for mask_kind in ("none", "rows", "flat"):
            if mask_kind == "none":
                mask = None
            elif mask_kind == "rows":
                mask = rng.mask(*rows_shape)
            else:
                if len(rows_shape) < 2:
                    continue
                mask = rng.mask(n)
            out_shape = rows_shape if reduction == "none" else ()
            upstream = rng.randn(*out_shape, dtype=dtype)
            kw = dict(temperature=temperature, divergence=divergence, beta=beta, reduction=reduction, mask=mask)
            tag = rng.tag(dtype=dtype, shape=shape, mask_kind=mask_kind, **kw)
            loss, grad = run_kd(s, t, upstream, **kw)
            want_loss, want_grad = reference_kd(s, t, upstream, **kw)
            assert loss.dtype == dtype and loss.shape == out_shape, tag
            assert grad.dtype == dtype and grad.shape == s.shape, tag
            summed = n if reduction == "sum" else 1
            close(loss, want_loss, dtype, f"loss {tag}", magnitude=temperature**2 * summed)
            close(grad, want_grad, dtype, f"grad {tag}", magnitude=temperature)
            if mask is not None and reduction == "none":
                # Dropped rows give exactly 0 and no gradient.
                dropped = ~mask.reshape(rows_shape)
                assert (loss[dropped] == 0).all(), tag
                assert (grad[dropped] == 0).all(), tag


def test_jsd_limits_and_symmetry(rng):
    """JSD with beta 0 or 1 is identically 0 (loss and gradient); beta=0.5 is symmetric in (s, t);
    reverse KL of (s, t) equals forward KL of (t, s)."""
    s, t = rng.randn(6, 13, dtype=F64, scale=3.0), rng.randn(6, 13, dtype=F64, scale=3.0)
    for beta in (0.0, 1.0):
        loss, grad = run_kd(s, t, divergence="jsd", beta=beta, temperature=1.5)
        tag = rng.tag(beta=beta)
        assert abs(float(loss)) < 1e-12, tag
        assert grad.abs().max() < 1e-12, tag
    a, _ = run_kd(s, t, divergence="jsd", beta=0.5, reduction="none")
    b, _ = run_kd(t, s, divergence="jsd", beta=0.5, reduction="none")
    close(a, b, F64, rng.tag(case="jsd symmetric"))
    assert (a > 0).all(), rng.tag(case="distinct rows have positive JSD")
    a, _ = run_kd(s, t, divergence="reverse_kl", reduction="none", temperature=2.0)
    b, _ = run_kd(t, s, divergence="kl", reduction="none", temperature=2.0)
    close(a, b, F64, rng.tag(case="reverse_kl(s,t) == kl(t,s)"))


def test_forward_kl_matches_torch_kl_div(rng):
    """Independent of distillx's reference: forward KL with batchmean is T² · F.kl_div(log q, log p)."""
    s, t = rng.randn(5, 11, dtype=F64), rng.randn(5, 11, dtype=F64)
    T = 3.0
    want = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1),
                                      reduction="batchmean", log_target=True) * T * T
    loss, _ = run_kd(s, t, temperature=T)
    close(loss, want, F64, rng.tag(case="kl_div"))
    # Identical distributions: zero loss and zero gradient.
    loss, grad = run_kd(s, s.clone(), temperature=T)
    assert abs(float(loss)) < 1e-12 and grad.abs().max() < 1e-12, rng.tag(case="s == t")


@pytest.mark.parametrize("student_dtype,teacher_dtype", [
    (torch.float32, torch.float64), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
    (torch.float64, torch.float16), (torch.float16, torch.float32)], ids=lambda d: str(d).split(".")[-1])
def test_teacher_of_other_dtype_is_converted(rng, student_dtype, teacher_dtype):
    s = rng.randn(4, 3, 19, dtype=student_dtype)
    t = rng.randn(4, 3, 19, dtype=teacher_dtype)
    for divergence in ("kl", "reverse_kl", "jsd"):
        kw = dict(divergence=divergence, temperature=2.0, beta=0.4, mask=rng.mask(4, 3))
        tag = rng.tag(student=student_dtype, teacher=teacher_dtype, **kw)
        loss, grad = run_kd(s, t, **kw)
        assert loss.dtype == student_dtype and grad.dtype == student_dtype, tag
        want_loss, want_grad = reference_kd(s, t, **kw)  # converts the teacher to the student's dtype
        close(loss, want_loss, student_dtype, f"loss {tag}")
        close(grad, want_grad, student_dtype, f"grad {tag}")
        # Same result as converting by hand.
        loss2, grad2 = run_kd(s, t.to(student_dtype), **kw)
        assert torch.equal(loss, loss2) and torch.equal(grad, grad2), tag


def test_teacher_requiring_grad_gets_no_gradient(rng):
    s = rng.randn(3, 8).requires_grad_(True)
    t = rng.randn(3, 8).requires_grad_(True)
    t64 = rng.randn(3, 8, dtype=F64).requires_grad_(True)  # converted teacher: still no gradient
    for teacher in (t, t64):
        for divergence in ("kl", "reverse_kl", "jsd"):
            for reduction in ("batchmean", "none"):
                out = DF.kd_loss(s, teacher, divergence=divergence, reduction=reduction)
                out.sum().backward()
                assert teacher.grad is None, rng.tag(divergence=divergence, reduction=reduction)
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_teacher_only_graph_is_not_differentiable(rng):
    """With only the teacher requiring grad, the loss is a constant: no grad_fn, nothing to backprop."""
    s = rng.randn(3, 8)
    t = rng.randn(3, 8).requires_grad_(True)
    out = DF.kd_loss(s, t)
    assert not out.requires_grad
    with pytest.raises(RuntimeError):
        out.backward()


def test_non_contiguous_inputs(rng):
    big = rng.randn(6, 40, dtype=torch.float32, scale=2.0).requires_grad_(True)
    t = rng.randn(40, 6, dtype=torch.float32, scale=2.0).t()[:, 5:18]  # (6, 13) transposed view
    s = big[:, 1::3][:, :13]  # (6, 13) strided view of a leaf
    assert not s.is_contiguous() and not t.is_contiguous()
    for divergence in ("kl", "reverse_kl", "jsd"):
        kw = dict(divergence=divergence, temperature=1.5, reduction="sum")
        tag = rng.tag(**kw)
        big.grad = None
        loss = DF.kd_loss(s, t, **kw)
        loss.backward()
        want_loss, want_grad = reference_kd(s.contiguous(), t.contiguous(), **kw)
        close(loss, want_loss, torch.float32, tag)
        close(big.grad[:, 1::3][:, :13], want_grad, torch.float32, tag)
        rest = big.grad.clone()
        rest[:, 1::3] = 0
        assert (rest == 0).all(), tag


def test_row_mask_of_leading_shape_equals_flat_mask_and_row_subset(rng):
    s, t = rng.randn(3, 4, 10), rng.randn(3, 4, 10)
    m = rng.mask(3, 4)
    for reduction in ("batchmean", "sum", "mean"):
        a, ga = run_kd(s, t, reduction=reduction, mask=m, divergence="jsd")
        b, gb = run_kd(s, t, reduction=reduction, mask=m.reshape(-1), divergence="jsd")
        assert torch.equal(a, b) and torch.equal(ga, gb), rng.tag(reduction=reduction)
        # Masking equals computing on the kept rows only.
        c, gc = run_kd(s[m], t[m], reduction=reduction, divergence="jsd")
        close(a, c, torch.float32, rng.tag(reduction=reduction, case="subset"))
        close(ga[m], gc, torch.float32, rng.tag(reduction=reduction, case="subset grad"))
        assert (ga[~m] == 0).all()


def test_reductions_are_consistent(rng):
    """batchmean = sum / kept rows, mean = sum / (kept rows · C), none sums to sum."""
    s, t = rng.randn(5, 7, dtype=F64), rng.randn(5, 7, dtype=F64)
    m = rng.mask(5)
    for mask in (None, m):
        kept = 5 if mask is None else int(mask.sum())
        kw = dict(divergence="reverse_kl", temperature=2.0, mask=mask)
        rows, _ = run_kd(s, t, reduction="none", **kw)
        total, _ = run_kd(s, t, reduction="sum", **kw)
        bm, _ = run_kd(s, t, reduction="batchmean", **kw)
        mean, _ = run_kd(s, t, reduction="mean", **kw)
        tag = rng.tag(mask=mask)
        close(rows.sum(), total, F64, tag)
        close(bm, total / kept, F64, tag)
        close(mean, total / (kept * 7), F64, tag)


def test_temperature_scaling(rng):
    """The loss is T²·D(softmax(t/T), softmax(s/T)): scaling logits and T together leaves D/T² fixed."""
    s, t = rng.randn(4, 9, dtype=F64), rng.randn(4, 9, dtype=F64)
    for divergence in ("kl", "reverse_kl", "jsd"):
        a, _ = run_kd(s, t, divergence=divergence, temperature=1.0)
        b, _ = run_kd(3 * s, 3 * t, divergence=divergence, temperature=3.0)
        close(b, 9 * a, F64, rng.tag(divergence=divergence))


# ----------------------------------------------------------------------------------------------
# Gradient checks and autograd behaviour
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "none"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)],
                         ids=lambda v: str(v))
def test_gradcheck(rng, divergence, beta, with_mask, reduction):
    """torch.autograd.gradcheck in float64 (it backpropagates through one graph several times, which
    takes the functional, retain_graph path of the backward)."""
    s = rng.randn(3, 5, dtype=F64, scale=1.5).requires_grad_(True)
    t = rng.randn(3, 5, dtype=F64, scale=1.5)
    mask = torch.tensor([True, False, True]) if with_mask else None
    kw = dict(temperature=1.7, divergence=divergence, beta=beta, reduction=reduction, mask=mask)
    assert torch.autograd.gradcheck(lambda x: DF.kd_loss(x, t, **kw), (s,)), rng.tag(**kw)


def _finite_difference(f, x, eps=1e-6):
    x = x.detach().clone()
    g = torch.zeros_like(x)
    flat, gflat = x.view(-1), g.view(-1)
    for i in range(flat.numel()):
        orig = float(flat[i])
        flat[i] = orig + eps
        fp = float(f(x))
        flat[i] = orig - eps
        fm = float(f(x))
        flat[i] = orig
        gflat[i] = (fp - fm) / (2 * eps)
    return g


@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)], ids=lambda v: str(v))
def test_single_backward_matches_finite_differences(rng, divergence, beta):
    """The plain single backward (graph freed: the saved gradient is scaled in place), under a random
    per-row upstream gradient, against central differences of the forward-only (no_grad) path."""
    s, t = rng.randn(2, 3, 4, dtype=F64, scale=1.5), rng.randn(2, 3, 4, dtype=F64, scale=1.5)
    mask = rng.mask(2, 3)
    v = rng.randn(2, 3, dtype=F64)
    kw = dict(temperature=0.8, divergence=divergence, beta=beta, reduction="none", mask=mask)

    def f(x):
        with torch.no_grad():
            return (DF.kd_loss(x, t, **kw) * v).sum()

    _, grad = run_kd(s, t, v, **kw)
    numeric = _finite_difference(f, s)
    tag = rng.tag(**kw)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8, msg=lambda m: f"{tag}\n{m}")
    assert grad.abs().max() > 1e-3, tag  # the check compares something


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("upstream", [1.0, 2.5])
@pytest.mark.parametrize("with_mask,at_least_one", [(False, True), (True, True), (True, False)])
def test_scalar_reductions_fold_into_the_row_weights(rng, reduction, upstream, with_mask, at_least_one):
    """The reduction's normalisation is folded into the row weights, so ``loss.backward()`` hands the
    op a uniform upstream gradient of 1 and the saved gradient is returned unscaled; any other upstream
    still scales it. Both against the float64 reference, with a mask that may drop every row."""
    s, t = rng.randn(5, 37, scale=2.0), rng.randn(5, 37, scale=2.0)
    mask = rng.mask(5, at_least_one=at_least_one) if with_mask else None
    kw = dict(temperature=1.5, divergence="kl", reduction=reduction, mask=mask)
    up = torch.tensor(upstream)
    loss, grad = run_kd(s, t, up, **kw)
    want_loss, want_grad = reference_kd(s, t, up, **kw)
    tag = rng.tag(upstream=upstream, **kw)
    close(loss, want_loss, torch.float32, tag)
    close(grad, want_grad, torch.float32, tag)
    if mask is not None and not mask.any():
        assert float(loss) == 0 and not grad.any(), tag


def test_uniform_one_is_a_broadcast_exact_one():
    from distillx.ops.logit_divergence import _uniform_one
    assert _uniform_one(torch.ones(()).expand(4))
    assert not _uniform_one(torch.full((), 2.0).expand(4))
    assert not _uniform_one(torch.ones(4))  # per-row gradients that happen to be 1: not a broadcast
    assert not _uniform_one(torch.ones(()).expand(0))
    assert not _uniform_one(torch.full((), float("nan")).expand(3))


def test_backward_twice_with_retain_graph(rng):
    """The gradient is produced in forward; backward only scales it. With retain_graph the scaling must
    not consume it: every backward through the same graph gives the same, correct gradient."""
    s = rng.randn(4, 6).requires_grad_(True)
    t = rng.randn(4, 6)
    for reduction in ("batchmean", "none"):
        s.grad = None
        loss = DF.kd_loss(s, t, temperature=2.0, reduction=reduction)
        up = torch.ones_like(loss) if reduction == "batchmean" else rng.randn(4)
        loss.backward(up, retain_graph=True)
        first = s.grad.clone()
        loss.backward(up * 3, retain_graph=True)  # a different upstream gradient on the same graph
        loss.backward(up)  # last one frees the graph
        _, want = reference_kd(s, t, up, temperature=2.0, reduction=reduction)
        tag = rng.tag(reduction=reduction)
        close(first, want, torch.float32, f"first backward {tag}")
        close(s.grad, 5 * want, torch.float32, f"accumulated backward {tag}")
        with pytest.raises(RuntimeError, match="second time|already been freed"):
            loss.backward(up)


def test_autograd_grad_and_create_graph(rng):
    """torch.autograd.grad (no accumulation) and create_graph=True give the same first-order gradient."""
    s, t = rng.randn(3, 7).requires_grad_(True), rng.randn(3, 7)
    _, want = reference_kd(s, t, divergence="jsd")
    (g1,) = torch.autograd.grad(DF.kd_loss(s, t, divergence="jsd"), s)
    (g2,) = torch.autograd.grad(DF.kd_loss(s, t, divergence="jsd"), s, create_graph=True)
    close(g1, want, torch.float32, rng.tag(case="autograd.grad"))
    close(g2, want, torch.float32, rng.tag(case="create_graph"))
    assert s.grad is None


def test_loss_used_twice_in_one_graph(rng):
    """One node, several consumers: autograd sums the upstream gradients before the (single) backward."""
    s, t = rng.randn(3, 10), rng.randn(3, 10)
    for reduction in ("batchmean", "none"):
        x = s.clone().requires_grad_(True)
        loss = DF.kd_loss(x, t, divergence="jsd", reduction=reduction)
        (loss * 2 + loss.exp().detach() * loss).sum().backward()
        want_loss, _ = reference_kd(s, t, divergence="jsd", reduction=reduction)
        up = 2 + want_loss.exp()
        _, want_grad = reference_kd(s, t, up, divergence="jsd", reduction=reduction)
        close(x.grad, want_grad, torch.float32, rng.tag(reduction=reduction))


def test_two_losses_on_one_student_accumulate(rng):
    s, t1, t2 = rng.randn(4, 9), rng.randn(4, 9), rng.randn(4, 9)
    x = s.clone().requires_grad_(True)
    (DF.kd_loss(x, t1) + DF.kd_loss(x, t2, divergence="reverse_kl")).backward()
    _, g1 = reference_kd(s, t1)
    _, g2 = reference_kd(s, t2, divergence="reverse_kl")
    close(x.grad, g1 + g2, torch.float32, rng.tag())


def test_no_grad_and_reduction_none_paths(rng):
    s, t = rng.randn(2, 3, 12), rng.randn(2, 3, 12)
    x = s.clone().requires_grad_(True)
    with torch.no_grad():
        a = DF.kd_loss(x, t, divergence="jsd", reduction="none")
    assert not a.requires_grad and a.grad_fn is None
    b = DF.kd_loss(x, t, divergence="jsd", reduction="none")
    assert b.requires_grad and b.shape == (2, 3)
    close(a, b, torch.float32, rng.tag(case="no_grad == grad forward"))
    v = rng.randn(2, 3)
    b.backward(v)
    _, want = reference_kd(s, t, v, divergence="jsd", reduction="none")
    close(x.grad, want, torch.float32, rng.tag(case="none backward"))
    # A student that does not require grad behaves like no_grad.
    c = DF.kd_loss(s, t, divergence="jsd", reduction="none")
    assert not c.requires_grad
    assert torch.equal(a, c)


# ----------------------------------------------------------------------------------------------
# Fallback to the reference
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def force_reference(monkeypatch):
    """Pretend no compiled kernel serves any op; count calls of the references."""
    calls = {"kd": 0, "linear": 0}
    kd_ref, lin_ref = ref.kd_loss_reference, ref.linear_kd_loss_reference

    def kd_spy(*a, **k):
        calls["kd"] += 1
        return kd_ref(*a, **k)

    def lin_spy(*a, **k):
        calls["linear"] += 1
        return lin_ref(*a, **k)

    monkeypatch.setattr(dlib, "_KERNELS", {})
    monkeypatch.setattr(dlib, "_FALLBACK_WARNED", set())
    monkeypatch.setattr(ref, "kd_loss_reference", kd_spy)
    monkeypatch.setattr(ref, "linear_kd_loss_reference", lin_spy)
    return calls


def test_fallback_uses_reference_and_warns_once(rng, force_reference):
    s, t = rng.randn(3, 2, 11), rng.randn(3, 2, 11)
    m = rng.mask(3, 2)
    kw = dict(divergence="jsd", beta=0.3, temperature=2.0, mask=m)
    with pytest.warns(RuntimeWarning, match="no compiled kernel for cpu; running the reference"):
        loss, grad = run_kd(s, t, **kw)
    assert force_reference["kd"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a second warning would raise
        loss2, grad2 = run_kd(s, t, reduction="none", **kw)
    assert force_reference["kd"] == 2
    assert loss2.shape == (3, 2)
    want_loss, want_grad = reference_kd(s, t, **kw)
    close(loss, want_loss, torch.float32, rng.tag(**kw))
    close(grad, want_grad, torch.float32, rng.tag(**kw))


def test_fallback_equals_kernel(rng, monkeypatch):
    s, t = rng.randn(5, 23), rng.randn(5, 23)
    for divergence, beta in DIVERGENCE_CASES:
        for reduction in REDUCTIONS:
            kw = dict(divergence=divergence, beta=beta, reduction=reduction, temperature=1.5, mask=rng.mask(5))
            up = rng.randn(5) if reduction == "none" else None
            k_loss, k_grad = run_kd(s, t, up, **kw)
            with monkeypatch.context() as mp:
                mp.setattr(dlib, "_KERNELS", {})
                mp.setattr(dlib, "_FALLBACK_WARNED", {("logit_divergence", "cpu")})  # already warned
                r_loss, r_grad = run_kd(s, t, up, **kw)
            tag = rng.tag(**kw)
            close(k_loss, r_loss, torch.float32, tag)
            close(k_grad, r_grad, torch.float32, tag)


def test_missing_extension_warns_once(rng, monkeypatch):
    monkeypatch.setattr(dlib, "_KERNELS", {})
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_ERROR", "simulated import failure")
    monkeypatch.setattr(_ext, "_WARNED", False)
    s, t = rng.randn(2, 5), rng.randn(2, 5)
    with pytest.warns(RuntimeWarning, match="distillx._C is not available.*simulated import failure"):
        loss, _ = run_kd(s, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run_kd(s, t)
    close(loss, reference_kd(s, t)[0], torch.float32, rng.tag())


# ----------------------------------------------------------------------------------------------
# Argument validation: every error names the argument.
# ----------------------------------------------------------------------------------------------
def _s():
    return torch.randn(4, 6)


BAD_KD_CALLS = [
    ("shape", lambda: DF.kd_loss(_s(), torch.randn(4, 7)), ValueError, r"teacher_logits shape \(4, 7\)"),
    ("shape-rows", lambda: DF.kd_loss(_s(), torch.randn(3, 6)), ValueError, "teacher_logits"),
    ("int-student", lambda: DF.kd_loss(torch.ones(4, 6, dtype=torch.long), _s()), TypeError, "student_logits"),
    ("int-teacher", lambda: DF.kd_loss(_s(), torch.ones(4, 6, dtype=torch.int32)), TypeError, "teacher_logits"),
    ("bool-teacher", lambda: DF.kd_loss(_s(), torch.ones(4, 6, dtype=torch.bool)), TypeError, "teacher_logits"),
    ("not-tensor", lambda: DF.kd_loss([[1.0, 2.0]], torch.randn(1, 2)), TypeError, "student_logits"),
    ("0-dim", lambda: DF.kd_loss(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "student_logits"),
    ("mask-len", lambda: DF.kd_loss(_s(), _s(), mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask"),
    ("mask-2d", lambda: DF.kd_loss(_s(), _s(), mask=torch.ones(4, 1, dtype=torch.bool)), ValueError, "mask"),
    ("mask-float", lambda: DF.kd_loss(_s(), _s(), mask=torch.ones(4)), TypeError, "mask"),
    ("mask-list", lambda: DF.kd_loss(_s(), _s(), mask=[True] * 4), TypeError, "mask"),
    ("mask-device", lambda: DF.kd_loss(_s(), _s(), mask=torch.ones(4, dtype=torch.bool, device="meta")),
     ValueError, "mask"),
    ("teacher-device", lambda: DF.kd_loss(_s(), torch.empty(4, 6, device="meta")), ValueError, "teacher_logits"),
    ("T-zero", lambda: DF.kd_loss(_s(), _s(), temperature=0.0), ValueError, "temperature"),
    ("T-neg", lambda: DF.kd_loss(_s(), _s(), temperature=-1.0), ValueError, "temperature"),
    ("T-nan", lambda: DF.kd_loss(_s(), _s(), temperature=float("nan")), ValueError, "temperature"),
    ("T-inf", lambda: DF.kd_loss(_s(), _s(), temperature=float("inf")), ValueError, "temperature"),
    ("T-str", lambda: DF.kd_loss(_s(), _s(), temperature="2"), ValueError, "temperature"),
    ("T-bool", lambda: DF.kd_loss(_s(), _s(), temperature=True), ValueError, "temperature"),
    ("beta-neg", lambda: DF.kd_loss(_s(), _s(), divergence="jsd", beta=-0.1), ValueError, "beta"),
    ("beta-big", lambda: DF.kd_loss(_s(), _s(), divergence="jsd", beta=1.5), ValueError, "beta"),
    ("beta-nan", lambda: DF.kd_loss(_s(), _s(), divergence="jsd", beta=float("nan")), ValueError, "beta"),
    ("divergence", lambda: DF.kd_loss(_s(), _s(), divergence="js"), ValueError, "divergence.*'js'"),
    ("reduction", lambda: DF.kd_loss(_s(), _s(), reduction="avg"), ValueError, "reduction.*'avg'"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in BAD_KD_CALLS], ids=[c[0] for c in BAD_KD_CALLS])
def test_bad_arguments_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()

