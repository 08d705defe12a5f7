"""distillx.functional.linear_kd_loss: chunked fused linear divergence against the float64 reference,
gradients for student hidden/weight/bias, chunking, dtypes, autograd behaviour, fallback, validation."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import distillx.functional as DF
from distillx.ops import _library as dlib
from distillx.ops import reference as ref

from .conftest import DTYPES, F64, HALF, close, reference_linear, run_linear

REDUCTIONS = ("batchmean", "sum", "mean", "none")

# name: (rows shape, Hs, Ht, C, student bias, teacher bias, chunk_size, teacher dtype (None: student's))
CONFIGS = {
    "n1": ((1,), 5, 5, 7, True, True, None, None),
    "chunk1-sbias": ((6,), 4, 3, 11, True, False, 1, None),
    "chunk3-tbias-3d": ((2, 4), 6, 8, 17, False, True, 3, None),
    "chunk>n-nobias": ((5,), 3, 3, 33, False, False, 64, None),
    "default-chunk-C1031": ((3, 3), 8, 5, 1031, True, True, None, None),
    "C1": ((4,), 3, 2, 1, True, True, 2, None),
    "teacher-f64": ((5,), 4, 6, 9, True, True, 2, torch.float64),
    "teacher-bf16": ((7,), 5, 4, 13, False, True, 4, torch.bfloat16),
}
DIVERGENCE_CASES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]


def make_inputs(rng, rows, hs_dim, ht_dim, C, s_bias, t_bias, dtype, teacher_dtype=None, scale=2.0):
    teacher_dtype = teacher_dtype or dtype
    hs = rng.randn(*rows, hs_dim, dtype=dtype)
    ws = rng.randn(C, hs_dim, dtype=dtype, scale=scale / math.sqrt(hs_dim))
    bs = rng.randn(C, dtype=dtype, scale=0.5) if s_bias else None
    ht = rng.randn(*rows, ht_dim, dtype=teacher_dtype)
    wt = rng.randn(C, ht_dim, dtype=teacher_dtype, scale=scale / math.sqrt(ht_dim))
    bt = rng.randn(C, dtype=teacher_dtype, scale=0.5) if t_bias else None
    return hs, ws, bs, ht, wt, bt


def check_against_reference(rng, inputs, dtype, upstream=None, tag_extra=None, **kw):
    hs, ws, bs, ht, wt, bt = inputs
    tag = rng.tag(dtype=dtype, **(tag_extra or {}), **kw)
    loss, grads = run_linear(*inputs, upstream, **kw)
    want_loss, want_grads = reference_linear(*inputs, upstream, **kw)
    rows = hs.shape[:-1]
    out_shape = rows if kw.get("reduction") == "none" else ()
    assert loss.dtype == dtype and loss.shape == out_shape, tag
    n = math.prod(rows)
    T = kw.get("temperature", 1.0)
    C = ws.shape[0]
    # The kernel materialises logits (rounded to the student dtype; a rounding error δ moves the
    # probabilities by δ/T) and sums C products per hidden-gradient entry (error ~ sqrt(C)·eps).
    spread = max(1.0, (C / 16) ** 0.5) * (max(1.0, 1.0 / T) if dtype in HALF else 1.0)
    # Half precision: the error a correct kernel has is what rounding its logits chunk and the logits
    # gradient to the dtype does to the float64 reference (large at T < 1, where logits/T amplify it).
    floors = [0.0] * 4
    if dtype in HALF:
        model_loss, model_grads = reference_linear(*inputs, upstream, model_rounding=True, **kw)
        floors = [4 * float((a - b).abs().max()) if a is not None else 0.0
                  for a, b in zip((model_loss, *model_grads), (want_loss, *want_grads))]
    close(loss, want_loss, dtype, f"loss {tag}", atol_floor=floors[0],
          magnitude=T * T * (n if kw.get("reduction") == "sum" else 1) * (1.0 / T if T < 1 and dtype in HALF else 1.0))
    for name, g, w, x, floor in zip(("student_hidden", "student_weight", "student_bias"), grads, want_grads,
                                    (hs, ws, bs), floors[1:]):
        if x is None:
            assert g is None, tag
            continue
        assert g is not None and g.dtype == x.dtype and g.shape == x.shape, f"{name} {tag}"
        close(g, w, dtype, f"grad {name} {tag}", magnitude=T * spread, atol_floor=floor)
    return loss, grads


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES, ids=[f"{d}-b{b}" for d, b in DIVERGENCE_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_matches_reference(rng, dtype, divergence, beta, config):
    rows, hs_dim, ht_dim, C, s_bias, t_bias, chunk_size, teacher_dtype = CONFIGS[config]
    inputs = make_inputs(rng, rows, hs_dim, ht_dim, C, s_bias, t_bias, dtype, teacher_dtype)
    temperature = rng.choice([0.5, 1.0, 2.0, 4.0])
    for reduction in REDUCTIONS:
        for mask in (None, rng.mask(*rows)):
            upstream = rng.randn(*(rows if reduction == "none" else ()), dtype=dtype)
            check_against_reference(rng, inputs, dtype, upstream, tag_extra=dict(config=config), temperature=temperature,
                                    divergence=divergence, beta=beta, reduction=reduction, mask=mask,
                                    chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d).split(".")[-1])
def test_chunk_size_does_not_change_the_result(rng, dtype):
    """Every chunking accumulates the same weight/bias gradient (sum over chunks) and row losses."""
    N = 7
    inputs = make_inputs(rng, (N,), 6, 5, 19, True, True, dtype)
    m = rng.mask(N)
    base = None
    for chunk_size in (None, 1, 2, 3, N - 1, N, N + 5, 1000):
        for reduction in ("batchmean", "none"):
            kw = dict(divergence="jsd", beta=0.3, temperature=2.0, reduction=reduction, mask=m, chunk_size=chunk_size)
            up = rng.randn(N, dtype=dtype) if reduction == "none" else None
            loss, grads = check_against_reference(rng, inputs, dtype, up, **kw)
            if reduction == "batchmean":
                if base is None:
                    base = (loss, grads)
                else:
                    tol = dict(rtol=1e-12, atol=1e-14) if dtype == F64 else dict(rtol=2e-6, atol=1e-7)
                    for a, b in zip((loss, *grads), (base[0], *base[1])):
                        close(a, b, dtype, rng.tag(chunk_size=chunk_size, case="vs chunk None"), **tol)


def test_gradient_accumulation_across_batches(rng):
    """Summed losses of two halves, backpropagated one after the other into the same leaves, equal the
    whole batch: the weight/bias gradients of each call are added once, with the right scale."""
    N = 10
    hs, ws, bs, ht, wt, bt = make_inputs(rng, (N,), 6, 4, 23, True, True, torch.float64)
    m = rng.mask(N)
    leaves = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
    for part in (slice(0, 4), slice(4, N)):
        DF.linear_kd_loss(leaves[0][part], leaves[1], ht[part], wt, leaves[2], bt, divergence="reverse_kl",
                          reduction="sum", mask=m[part], chunk_size=3).backward()
    loss, grads = run_linear(hs, ws, bs, ht, wt, bt, divergence="reverse_kl", reduction="sum", mask=m, chunk_size=3)
    for a, b in zip((x.grad for x in leaves), grads):
        close(a, b, F64, rng.tag(case="accumulated halves"))
    want_loss, want_grads = reference_linear(hs, ws, bs, ht, wt, bt, divergence="reverse_kl", reduction="sum", mask=m)
    for a, b in zip(grads, want_grads):
        close(a, b, F64, rng.tag(case="whole batch vs reference"))


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_gradcheck(rng, divergence, with_mask, reduction):
    """torch.autograd.gradcheck w.r.t. student hidden, weight and bias; 'none' takes the backward path
    that recomputes the chunks with the upstream gradient folded into the row weights."""
    hs, ws, bs, ht, wt, bt = make_inputs(rng, (4,), 3, 2, 5, True, rng.choice([True, False]), F64, scale=1.5)
    mask = torch.tensor([True, False, True, True]) if with_mask else None
    kw = dict(temperature=1.5, divergence=divergence, beta=0.3, reduction=reduction, mask=mask, chunk_size=3)
    leaves = tuple(x.clone().requires_grad_(True) for x in (hs, ws, bs))
    assert torch.autograd.gradcheck(lambda h, w, b: DF.linear_kd_loss(h, w, ht, wt, b, bt, **kw), leaves), rng.tag(**kw)
    # Without a student bias.
    assert torch.autograd.gradcheck(lambda h, w: DF.linear_kd_loss(h, w, ht, wt, None, bt, **kw), leaves[:2]), \
        rng.tag(**kw)


def test_teacher_gets_no_gradient(rng):
    hs, ws, bs, ht, wt, bt = make_inputs(rng, (2, 3), 4, 5, 9, True, True, torch.float32)
    teacher = [x.clone().requires_grad_(True) for x in (ht, wt, bt)]
    for reduction in ("batchmean", "none"):
        for divergence in ("kl", "reverse_kl", "jsd"):
            out = DF.linear_kd_loss(hs.requires_grad_(True), ws, teacher[0], teacher[1], bs, teacher[2],
                                    divergence=divergence, reduction=reduction)
            out.sum().backward()
            assert all(x.grad is None for x in teacher), rng.tag(reduction=reduction, divergence=divergence)
    assert hs.grad is not None and hs.grad.abs().sum() > 0


def test_partial_requires_grad(rng):
    """Only the parameters that require grad get one, and it is the right one (frozen hidden, frozen weight)."""
    inputs = make_inputs(rng, (5,), 4, 3, 10, True, False, torch.float32)
    hs, ws, bs, ht, wt, bt = inputs
    kw = dict(divergence="jsd", temperature=2.0, chunk_size=2)
    _, want = reference_linear(*inputs, **kw)
    for needs in ((False, True, False), (False, False, True), (True, False, False), (False, True, True)):
        leaves = [x.clone().requires_grad_(r) for x, r in zip((hs, ws, bs), needs)]
        DF.linear_kd_loss(leaves[0], leaves[1], ht, wt, leaves[2], bt, **kw).backward()
        for x, r, w in zip(leaves, needs, want):
            tag = rng.tag(requires_grad=needs)
            if r:
                close(x.grad, w, torch.float32, tag)
            else:
                assert x.grad is None, tag


def test_student_weight_of_other_dtype(rng):
    """Weight/bias in float32 with bfloat16 hidden (mixed precision): the weight is cast to the hidden
    dtype, the gradient comes back in the weight's dtype."""
    hs = rng.randn(6, 8, dtype=torch.bfloat16)
    ws = rng.randn(21, 8, dtype=torch.float32, scale=0.5)
    bs = rng.randn(21, dtype=torch.float64, scale=0.5)
    ht, wt = rng.randn(6, 3, dtype=torch.float32), rng.randn(21, 3, dtype=torch.float32)
    loss, grads = check_against_reference(rng, (hs, ws, bs, ht, wt, None), torch.bfloat16, chunk_size=4,
                                          divergence="kl", temperature=2.0)
    assert loss.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[-1])
def test_half_inputs_over_several_weight_blocks(rng, dtype):
    """On the CPU, half-precision GEMMs run in float32 with the weights converted in blocks of rows
    (~8 MB of float32 each: 64 rows at width 32768), so C = 150 spans three blocks; a half teacher
    (converted and rounded block by block) and a float32 one, both with biases."""
    H = 1 << 15
    for teacher_dtype in (dtype, torch.float32):
        inputs = make_inputs(rng, (5,), H, H, 150, True, True, dtype, teacher_dtype, scale=1.0)
        divergence = rng.choice(["kl", "jsd"])
        check_against_reference(rng, inputs, dtype, divergence=divergence, chunk_size=2, temperature=2.0,
                                tag_extra=dict(teacher_dtype=teacher_dtype))
        if teacher_dtype == torch.float32:
            # Sharper than the reference's tolerance (made for O(1) gradients; these are ~1/sqrt(H)):
            # the float32 op on the same values, up to rounding the results to the half dtype.
            loss, grads = run_linear(*inputs, divergence=divergence, chunk_size=2, temperature=2.0)
            up = [x.float() if x is not None else None for x in inputs[:3]] + list(inputs[3:])
            want_loss, want_grads = run_linear(*up, divergence=divergence, chunk_size=2, temperature=2.0)
            for got, want in zip((loss, *grads), (want_loss, *want_grads)):
                torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()),
                                           msg=rng.tag(dtype=dtype))


def test_teacher_hidden_converted_to_teacher_weight_dtype(rng):
    hs, ws = rng.randn(4, 5, dtype=F64), rng.randn(7, 5, dtype=F64)
    ht, wt = rng.randn(4, 3, dtype=torch.float32), rng.randn(7, 3, dtype=F64)
    bt = rng.randn(7, dtype=torch.bfloat16)
    check_against_reference(rng, (hs, ws, None, ht, wt, bt), F64, chunk_size=3, divergence="reverse_kl")


def test_linear_equals_kd_loss_on_materialised_logits(rng):
    """The fused op is kd_loss on hidden @ W.T + b (both compiled paths, float64)."""
    hs, ws, bs, ht, wt, bt = make_inputs(rng, (3, 4), 6, 7, 29, True, True, F64)
    m = rng.mask(3, 4)
    for divergence in ("kl", "reverse_kl", "jsd"):
        kw = dict(divergence=divergence, temperature=3.0, mask=m, reduction="mean")
        a, _ = run_linear(hs, ws, bs, ht, wt, bt, chunk_size=5, **kw)
        b = DF.kd_loss(torch.nn.functional.linear(hs, ws, bs), torch.nn.functional.linear(ht, wt, bt), **kw)
        close(a, b, F64, rng.tag(**kw))


def test_backward_twice_is_allowed_and_correct(rng):
    """Unlike kd_loss, the linear op scales its saved gradients functionally: retain_graph works."""
    inputs = make_inputs(rng, (5,), 4, 4, 8, True, True, F64)
    hs, ws, bs, ht, wt, bt = inputs
    for reduction in ("batchmean", "none"):
        leaves = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
        out = DF.linear_kd_loss(leaves[0], leaves[1], ht, wt, leaves[2], bt, reduction=reduction, chunk_size=2)
        out.sum().backward(retain_graph=True)
        out.sum().backward()
        _, want = reference_linear(*inputs, reduction=reduction,
                                   upstream=torch.ones(5, dtype=F64) if reduction == "none" else None)
        for x, w in zip(leaves, want):
            close(x.grad, 2 * w, F64, rng.tag(reduction=reduction))


def test_no_grad_path(rng):
    inputs = make_inputs(rng, (2, 3), 4, 4, 12, True, True, torch.float32)
    hs, ws, bs, ht, wt, bt = inputs
    leaves = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
    for reduction in REDUCTIONS:
        with torch.no_grad():
            a = DF.linear_kd_loss(leaves[0], leaves[1], ht, wt, leaves[2], bt, reduction=reduction, chunk_size=4)
        assert not a.requires_grad, reduction
        want, _ = reference_linear(*inputs, reduction=reduction)
        close(a, want, torch.float32, rng.tag(reduction=reduction))


def test_all_rows_masked_and_empty_batch(rng):
    hs, ws, bs, ht, wt, bt = make_inputs(rng, (4,), 3, 3, 6, True, True, torch.float32)
    none = torch.zeros(4, dtype=torch.bool)
    for reduction in REDUCTIONS:
        loss, grads = run_linear(hs, ws, bs, ht, wt, bt, reduction=reduction, mask=none, chunk_size=3)
        tag = rng.tag(reduction=reduction)
        assert torch.isfinite(loss).all() and (loss == 0).all(), tag
        assert all((g == 0).all() for g in grads), tag
        loss, grads = run_linear(hs[:0], ws, bs, ht[:0], wt, bt, reduction=reduction)
        assert (loss == 0).all() and loss.shape == ((0,) if reduction == "none" else ()), tag
        assert grads[0].shape == (0, 3) and (grads[1] == 0).all() and (grads[2] == 0).all(), tag


def test_masked_rows_with_nan_do_not_leak(rng):
    """A dropped row's hidden state must not reach the loss or any gradient, even when it is NaN/inf
    (kd_loss guarantees this for logits). The weight gradient is Σ_rows g_rowᵀ·h_row, so a dropped row
    with a zero logit gradient still contributes 0·NaN = NaN unless its hidden state is skipped."""
    hs, ws, bs, ht, wt, bt = make_inputs(rng, (4,), 3, 2, 6, True, True, torch.float32)
    hs[1] = float("nan")
    ht[1, 0] = float("inf")
    m = torch.tensor([True, False, True, True])
    for chunk_size in (1, 3, None):
        loss, grads = run_linear(hs, ws, bs, ht, wt, bt, mask=m, chunk_size=chunk_size)
        keep = m.nonzero().squeeze(1)
        want_loss, want = reference_linear(hs[keep], ws, bs, ht[keep], wt, bt)
        tag = rng.tag(chunk_size=chunk_size)
        close(loss, want_loss, torch.float32, f"loss {tag}")
        close(grads[0][keep], want[0], torch.float32, f"student_hidden {tag}")
        assert (grads[0][1] == 0).all(), tag
        close(grads[2], want[2], torch.float32, f"student_bias {tag}")
        close(grads[1], want[1], torch.float32, f"student_weight {tag}")


def test_fallback_uses_reference_and_warns_once(rng, monkeypatch):
    inputs = make_inputs(rng, (2, 3), 4, 5, 11, True, False, torch.float32)
    kw = dict(divergence="jsd", beta=0.4, temperature=2.0, mask=rng.mask(2, 3), chunk_size=2)
    k_loss, k_grads = run_linear(*inputs, **kw)
    calls = []
    real = ref.linear_kd_loss_reference
    monkeypatch.setattr(ref, "linear_kd_loss_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(dlib, "_KERNELS", {})
    monkeypatch.setattr(dlib, "_FALLBACK_WARNED", set())
    with pytest.warns(RuntimeWarning, match="linear_divergence has no compiled kernel for cpu"):
        r_loss, r_grads = run_linear(*inputs, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run_linear(*inputs, **kw)
    assert len(calls) == 2
    close(k_loss, r_loss, torch.float32, rng.tag(**kw))
    for a, b in zip(k_grads, r_grads):
        close(a, b, torch.float32, rng.tag(**kw))


# ----------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------
def _args(**over):
    a = dict(student_hidden=torch.randn(4, 3), student_weight=torch.randn(6, 3), teacher_hidden=torch.randn(4, 5),
             teacher_weight=torch.randn(6, 5), student_bias=None, teacher_bias=None)
    a.update(over)
    return a


BAD_LINEAR = [
    ("sw-width", dict(student_weight=torch.randn(6, 4)), ValueError, r"student_weight must have shape \(C, 3\)"),
    ("sw-1d", dict(student_weight=torch.randn(6)), ValueError, "student_weight"),
    ("sw-3d", dict(student_weight=torch.randn(6, 3, 1)), ValueError, "student_weight"),
    ("tw-width", dict(teacher_weight=torch.randn(6, 3)), ValueError, "teacher_weight"),
    ("classes", dict(teacher_weight=torch.randn(7, 5)), ValueError, "teacher_weight has 7 classes"),
    ("sbias-shape", dict(student_bias=torch.randn(5)), ValueError, r"student_bias must have shape \(6,\)"),
    ("sbias-2d", dict(student_bias=torch.randn(1, 6)), ValueError, "student_bias"),
    ("tbias-shape", dict(teacher_bias=torch.randn(7)), ValueError, "teacher_bias"),
    ("sbias-int", dict(student_bias=torch.ones(6, dtype=torch.long)), TypeError, "student_bias"),
    ("th-rows", dict(teacher_hidden=torch.randn(3, 5)), ValueError, "teacher_hidden leading shape"),
    ("th-lead", dict(student_hidden=torch.randn(2, 2, 3), teacher_hidden=torch.randn(4, 5)), ValueError,
     "teacher_hidden"),
    ("sh-int", dict(student_hidden=torch.ones(4, 3, dtype=torch.int64)), TypeError, "student_hidden"),
    ("th-int", dict(teacher_hidden=torch.ones(4, 5, dtype=torch.int64)), TypeError, "teacher_hidden"),
    ("sw-int", dict(student_weight=torch.ones(6, 3, dtype=torch.int64)), TypeError, "student_weight"),
    ("tw-device", dict(teacher_weight=torch.empty(6, 5, device="meta")), ValueError, "teacher_weight"),
]


@pytest.mark.parametrize("over,exc,match", [c[1:] for c in BAD_LINEAR], ids=[c[0] for c in BAD_LINEAR])
def test_bad_arguments_name_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        DF.linear_kd_loss(**_args(**over))


@pytest.mark.parametrize("chunk_size", [0, -1, True, False, 2.0, "4"], ids=repr)
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        DF.linear_kd_loss(**_args(), chunk_size=chunk_size)


BAD_LINEAR_OPTIONS = [
    (dict(temperature=0.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(beta=1.01), "beta"), (dict(beta=-1e-9), "beta"),
    (dict(divergence="KL"), "divergence"), (dict(reduction="mean_rows"), "reduction"),
]


@pytest.mark.parametrize("over,match", BAD_LINEAR_OPTIONS, ids=[m + str(i) for i, (_, m) in enumerate(BAD_LINEAR_OPTIONS)])
def test_bad_options(over, match):
    with pytest.raises(ValueError, match=match):
        DF.linear_kd_loss(**_args(), **over)


def test_bad_mask():
    with pytest.raises(ValueError, match="mask"):
        DF.linear_kd_loss(**_args(), mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        DF.linear_kd_loss(**_args(), mask=torch.ones(4, dtype=torch.uint8))
