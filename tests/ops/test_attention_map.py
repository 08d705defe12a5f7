"""distillx.functional.attention_map_loss (AT) and the raw ops distillx::attention_map /
attention_map_backward: agreement with the float64 reference and a hand-written oracle (p, channel counts,
spatial sizes in both directions incl. non-divisible ones, B = 1), all-zero maps, gradcheck, opcheck,
torch.compile and argument validation."""
from __future__ import annotations

import math

import pytest
import torch

import distillx.functional as DF
from distillx.ops import reference as ref

from .conftest import F64, close, requires_kernel
from .feature_helpers import dtype_id, num_threads, oracle_attention_map_loss, run_loss, run_ref

PS = (1.0, 1.5, 2.0, 3.0)
DTYPES = (torch.float32, F64)
# (student shape, teacher shape) (B, C, H, W).
AT_SHAPES = [
    ((2, 3, 4, 5), (2, 3, 4, 5)),        # same size
    ((2, 3, 4, 5), (2, 8, 4, 5)),        # channel counts differ
    ((1, 4, 6, 6), (1, 2, 6, 6)),        # B = 1
    ((2, 3, 10, 14), (2, 5, 5, 7)),      # student larger (exactly 2x)
    ((2, 5, 5, 7), (2, 3, 10, 14)),      # teacher larger (exactly 2x)
    ((2, 2, 7, 7), (2, 6, 3, 3)),        # student larger, non-divisible
    ((1, 6, 3, 3), (1, 2, 7, 7)),        # teacher larger, non-divisible
    ((2, 3, 6, 5), (2, 4, 4, 9)),        # student taller, teacher wider: both pooled
    ((3, 1, 1, 1), (3, 7, 2, 3)),        # 1x1 maps, C = 1
    ((2, 3, 1, 9), (2, 3, 5, 2)),
]


def _at(p):
    def fn(f_s, f_t):
        return DF.attention_map_loss(f_s, f_t, p)
    return fn


def _at_ref(p):
    def fn(f_s, f_t):
        return ref.attention_map_loss_reference(f_s, f_t, p)
    return fn


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("p", PS, ids=lambda p: f"p{p}")
def test_matches_reference(rng, p, dtype):
    """Loss and gradient w.r.t. f_s agree with the float64 reference for every shape pair, under a random
    upstream gradient; both in the input dtype."""
    for s_shape, t_shape in AT_SHAPES:
        f_s, f_t = rng.randn(*s_shape, dtype=dtype), rng.randn(*t_shape, dtype=dtype, scale=2.0)
        up = float(rng.randn(1, dtype=F64)) + 2.0
        tag = rng.tag(p=p, dtype=dtype, s=s_shape, t=t_shape, upstream=up)
        loss, grad = run_loss(_at(p), f_s, f_t, upstream=up)
        want, want_grad = run_ref(_at_ref(p), f_s, f_t, upstream=up)
        assert loss.dtype == dtype and loss.shape == (), tag
        assert grad.dtype == dtype and grad.shape == f_s.shape, tag
        close(loss, want, dtype, f"loss {tag}")
        close(grad, want_grad, dtype, f"grad {tag}", magnitude=up)


@pytest.mark.parametrize("p", PS, ids=lambda p: f"p{p}")
def test_matches_oracle(rng, p):
    """The loss (and its gradient) against a hand-written AT: channel mean of |F|^p, explicit adaptive
    pooling bins, per-sample L2 normalisation, mean of squared differences."""
    for s_shape, t_shape in AT_SHAPES:
        f_s, f_t = rng.randn(*s_shape, dtype=F64), rng.randn(*t_shape, dtype=F64)
        tag = rng.tag(p=p, s=s_shape, t=t_shape)
        loss, grad = run_loss(_at(p), f_s, f_t)
        want, want_grad = run_ref(oracle_attention_map_loss, f_s, f_t, p=p)
        close(loss, want, F64, f"loss {tag}")
        close(grad, want_grad, F64, f"grad {tag}")


def test_known_values(rng):
    """Hand-checkable cases: identical maps (up to a per-sample positive factor, any channel count) give 0;
    a one-hot student map against a uniform teacher map of k = H·W cells gives mean((e − 1/√k)²) =
    2(1 − 1/√k)/k; pooling a teacher 2x larger by 2x2 block means reproduces the student map exactly."""
    f = rng.randn(2, 3, 4, 4, dtype=F64)
    for p in PS:
        scaled = torch.cat([f, f * 1.0], 1) * torch.tensor([2.0, 0.5], dtype=F64).view(2, 1, 1, 1)
        tag = rng.tag(p=p)
        close(DF.attention_map_loss(f, scaled, p), torch.zeros((), dtype=F64), F64, tag, atol=1e-14)
    H, W = 3, 4
    k = H * W
    f_s = torch.zeros(1, 2, H, W, dtype=F64)
    f_s[0, :, 1, 2] = 3.0
    f_t = torch.ones(1, 5, H, W, dtype=F64)
    want = 2 * (1 - 1 / math.sqrt(k)) / k
    for p in PS:
        close(DF.attention_map_loss(f_s, f_t, p), torch.tensor(want, dtype=F64), F64, f"one-hot p={p}")
    # Teacher 2x larger whose 2x2 blocks average (in |F|^2 channel mean) to the student map.
    a = rng.rand(2, 3, 5, dtype=F64) + 0.1
    f_s = a.sqrt().unsqueeze(1)                        # mean_c |f_s|² = a
    block = a.repeat_interleave(2, -2).repeat_interleave(2, -1)
    noise = 1 + 0.5 * torch.tensor([[1, -1], [-1, 1]], dtype=F64).repeat(3, 5)  # averages to 1 per block
    f_t = (block * noise).sqrt().unsqueeze(1)
    close(DF.attention_map_loss(f_s, f_t, 2.0), torch.zeros((), dtype=F64), F64, "2x2 pooling", atol=1e-14)
    assert float(DF.attention_map_loss(f_s, f_t[..., 1:, 1:], 2.0)) > 1e-6  # not by accident


@pytest.mark.parametrize("p", PS, ids=lambda p: f"p{p}")
def test_all_zero_maps(rng, p):
    """All-zero feature maps: the normalisation must not produce NaN. Both zero -> loss 0 and gradient 0;
    one side zero -> loss = mean over (b, k) of the other's normalised map squared = 1 / (H·W)."""
    for dtype in DTYPES:
        zs, zt = torch.zeros(2, 3, 4, 5, dtype=dtype), torch.zeros(2, 6, 8, 10, dtype=dtype)
        fs, ft = rng.randn(2, 3, 4, 5, dtype=dtype), rng.randn(2, 6, 8, 10, dtype=dtype)
        for a, b, want in ((zs, zt, 0.0), (zs, ft, 1 / 20), (fs, zt, 1 / 20)):
            tag = rng.tag(p=p, dtype=dtype, student_zero=bool((a == 0).all()), teacher_zero=bool((b == 0).all()))
            loss, grad = run_loss(_at(p), a, b)
            assert torch.isfinite(loss) and bool(torch.isfinite(grad).all()), tag
            close(loss, torch.tensor(want, dtype=F64), dtype, tag)
            if want == 0.0 or (a == 0).all():
                assert (grad == 0).all(), tag
        # One sample zero, the other not: only the zero sample has no gradient.
        f = fs.clone()
        f[0] = 0
        loss, grad = run_loss(_at(p), f, ft)
        _, want_grad = run_ref(_at_ref(p), f, ft)
        tag = rng.tag(p=p, dtype=dtype, case="sample 0 zero")
        assert bool(torch.isfinite(grad).all()) and (grad[0] == 0).all() and grad[1].abs().sum() > 0, tag
        close(grad, want_grad, dtype, tag)


@pytest.mark.parametrize("p", PS, ids=lambda p: f"p{p}")
def test_gradcheck(rng, p):
    for s_shape, t_shape in (((2, 3, 4, 5), (2, 2, 3, 3)), ((1, 2, 3, 3), (1, 4, 7, 7)), ((2, 1, 2, 3), (2, 3, 2, 3))):
        f_s = rng.randn(*s_shape, dtype=F64).requires_grad_(True)
        f_t = rng.randn(*t_shape, dtype=F64)
        assert torch.autograd.gradcheck(lambda x: DF.attention_map_loss(x, f_t, p), (f_s,)), \
            rng.tag(p=p, s=s_shape, t=t_shape)


def test_teacher_is_constant(rng):
    f_s = rng.randn(2, 3, 4, 4).requires_grad_(True)
    f_t = rng.randn(2, 5, 8, 8).requires_grad_(True)
    DF.attention_map_loss(f_s, f_t).backward()
    assert f_t.grad is None and f_s.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_half_inputs(rng, dtype):
    f_s, f_t = rng.randn(2, 3, 6, 6, dtype=dtype), rng.randn(2, 4, 3, 3, dtype=dtype)
    for p in (1.0, 2.0):
        tag = rng.tag(p=p, dtype=dtype)
        loss, grad = run_loss(_at(p), f_s, f_t)
        want, want_grad = run_ref(_at_ref(p), f_s, f_t)
        assert loss.dtype == dtype and grad.dtype == dtype, tag
        close(loss, want, dtype, f"loss {tag}")
        close(grad, want_grad, dtype, f"grad {tag}")


# ----------------------------------------------------------------------------------------------
# The raw operators
# ----------------------------------------------------------------------------------------------
def _unit_map_ref(f, p, g):
    """The op's reference on float64: the unit-scaled map, the scales, and the gradient of <map, g>."""
    want, want_grad = run_ref(lambda v: (ref.unit_attention_map(v, p) * g.to(F64)).sum(), f)
    return ref.unit_attention_map(f.to(F64), p), ref.sample_scale(f.to(F64)), want_grad


@requires_kernel
@pytest.mark.parametrize("p", PS + (0.5, 6.0), ids=lambda p: f"p{p}")
def test_fused_attention_map_matches_reference(rng, p):
    """distillx::attention_map = (reference.unit_attention_map, reference.sample_scale): mean_c |F/m|^p
    with m each sample's max |F|, and its backward (through attention_map_backward) = autograd of the
    reference with m constant, including exact zeros in the input (derivative 0 there for p >= 1),
    spatial sizes that are not a multiple of the vector width and samples of very different scales."""
    for dtype in DTYPES:
        for shape in ((1, 1, 1, 1), (2, 3, 5, 7), (3, 5, 8, 8), (1, 2, 33, 17)):
            f = rng.randn(*shape, dtype=dtype) * torch.logspace(-3, 3, shape[0], dtype=dtype).view(-1, 1, 1, 1)
            if p >= 1:
                f.view(-1)[::3] = 0
            g = rng.randn(shape[0], shape[2], shape[3], dtype=dtype)
            tag = rng.tag(p=p, dtype=dtype, shape=shape)
            x = f.clone().requires_grad_(True)
            out, scale = torch.ops.distillx.attention_map(x, p)
            (grad,) = torch.autograd.grad(out, x, g)
            want_map, want_scale, want_grad = _unit_map_ref(f, p, g)
            assert out.dtype == dtype and out.shape == (shape[0], shape[2], shape[3]), tag
            assert scale.dtype == dtype and scale.shape == (shape[0],) and not scale.requires_grad, tag
            close(out, want_map, dtype, f"map {tag}")
            assert torch.equal(scale.to(F64), want_scale), tag  # a maximum: exact
            close(grad, want_grad, dtype, f"grad {tag}")
            close(torch.ops.distillx.attention_map_backward(g, f, scale, p), want_grad, dtype, f"backward op {tag}")


@requires_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fused_map_is_finite_far_out_of_range(rng, dtype):
    """|F|^p would overflow (F ~ 1e30, p = 4 in float32) or vanish (F ~ 1e-30): the unit-scaled map is
    finite and equals the reference; an all-zero sample has scale 1 and map 0."""
    big = 1e30 if dtype == torch.float32 else 1e300
    f = torch.stack([rng.randn(3, 6, 5, dtype=dtype) * big, rng.randn(3, 6, 5, dtype=dtype) / big,
                     torch.zeros(3, 6, 5, dtype=dtype)])
    g = rng.randn(3, 6, 5, dtype=dtype)
    for p in (2.0, 4.0):
        tag = rng.tag(p=p, dtype=dtype)
        x = f.clone().requires_grad_(True)
        out, scale = torch.ops.distillx.attention_map(x, p)
        (grad,) = torch.autograd.grad(out, x, g)
        want_map, want_scale, want_grad = _unit_map_ref(f, p, g)
        assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(grad[:2]).all()), tag
        assert float(scale[2]) == 1.0 and bool((out[2] == 0).all()) and bool((grad[2] == 0).all()), tag
        close(out, want_map, dtype, f"map {tag}")
        assert torch.equal(scale.to(F64), want_scale), tag
        for b in range(3):  # each sample against its own gradient scale (they differ by 1e60)
            close(grad[b], want_grad[b], dtype, f"grad sample {b} {tag}")


def _subnormal_sample(rng, shape, dtype):
    """A (C, H, W) sample whose max |F| is subnormal in ``dtype`` (1e-39 in float32/bfloat16, 1e-309 in
    float64), where 1 / max|F| overflows: the case that made the fused map NaN."""
    tiny = 1e-309 if dtype == F64 else 1e-39
    f = rng.randn(*shape, dtype=F64)
    return (f / f.abs().max() * tiny).to(dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, F64), ids=dtype_id)
@pytest.mark.parametrize("p", (1.5, 2.0), ids=lambda p: f"p{p}")
def test_subnormal_features(rng, dtype, p):
    """Features of subnormal magnitude (student, teacher, or one sample among normal ones on either
    side): loss and gradient are finite and equal the float64 reference on the same values. Each
    sample's gradient is compared on its own scale (a subnormal sample's is ~1/max|F|, ~1e37)."""
    B, s_shape, t_shape = 3, (3, 6, 6), (5, 6, 6)
    for case in ("student", "teacher", "one student sample", "one teacher sample"):
        f_s = torch.stack([rng.randn(*s_shape, dtype=dtype) for _ in range(B)])
        f_t = torch.stack([rng.randn(*t_shape, dtype=dtype) for _ in range(B)])
        side, shape = (f_s, s_shape) if "student" in case else (f_t, t_shape)
        for b in ((1,) if case.startswith("one") else range(B)):
            side[b] = _subnormal_sample(rng, shape, dtype)
        assert side.abs().max() > 0 and (side[1].abs().max() < torch.finfo(dtype).tiny), case
        tag = rng.tag(p=p, dtype=dtype, case=case)
        loss, grad = run_loss(_at(p), f_s, f_t)
        want, want_grad = run_ref(_at_ref(p), f_s, f_t)
        assert bool(torch.isfinite(want)) and bool(torch.isfinite(want_grad).all()), f"reference {tag}"
        assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all()), tag
        close(loss, want, dtype, f"loss {tag}")
        for b in range(B):
            close(grad[b], want_grad[b], dtype, f"grad sample {b} {tag}")


@requires_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fused_map_subnormal_on_threads(rng, dtype):
    """The raw op on a subnormal sample next to a normal one, on 1 and 2 threads (the subnormal sample's
    rows split into tasks whose maxima are subnormal too): map and gradient equal the reference."""
    f = torch.stack([_subnormal_sample(rng, (4, 9, 70), dtype), rng.randn(4, 9, 70, dtype=dtype)])
    g = rng.randn(2, 9, 70, dtype=dtype, scale=1e-3)  # (p/C)·g/m stays in float32's range
    want_map, want_scale, want_grad = _unit_map_ref(f, 2.0, g)
    assert bool(torch.isfinite(want_grad).all()), rng.tag(dtype=dtype)
    for threads in (1, 2):
        tag = rng.tag(dtype=dtype, threads=threads)
        with num_threads(threads):
            x = f.clone().requires_grad_(True)
            out, scale = torch.ops.distillx.attention_map(x, 2.0)
            (grad,) = torch.autograd.grad(out, x, g)
        assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(grad).all()), tag
        close(out, want_map, dtype, f"map {tag}")
        assert torch.equal(scale.to(F64), want_scale), tag
        for b in range(2):
            close(grad[b], want_grad[b], dtype, f"grad sample {b} {tag}")


@requires_kernel
def test_fused_map_nan_and_inf_stay_in_their_sample(rng):
    """A NaN anywhere in a sample makes that sample's map and scale NaN (as the reference's max |F| is);
    an inf makes its scale inf, its map NaN where F is inf and 0 elsewhere; the other samples are
    untouched. On 1 and 2 threads (rows split into tasks that each see part of the sample)."""
    f = rng.randn(3, 4, 9, 70)
    f[0, 2, 5, 60] = float("nan")
    f[1, 1, 0, 3] = float("inf")
    for threads in (1, 2):
        with num_threads(threads):
            out, scale = torch.ops.distillx.attention_map(f, 2.0)
        tag = rng.tag(threads=threads)
        assert bool(torch.isnan(out[0]).all()) and bool(torch.isnan(scale[0])), tag
        assert float(scale[1]) == float("inf") and bool(torch.isnan(out[1, 0, 3])), tag
        assert int(torch.isnan(out[1]).sum()) == 1 and float(out[1].nan_to_num().abs().sum()) == 0.0, tag
        close(out[2], ref.unit_attention_map(f[2:].to(F64), 2.0)[0], torch.float32, tag)
        assert float(scale[2]) == float(f[2].abs().max()), tag


@requires_kernel
@pytest.mark.parametrize("shape", [(3, 64, 33, 40), (1, 8, 70, 70), (5, 4, 72, 64)],
                         ids=["rows-split", "one-sample-over-4096", "whole-rows-over-4096"])
def test_threads(rng, shape):
    """Forward (whole rows per task, up to 4096 columns, or rows split when there are fewer samples than
    2 × threads: tasks of one sample then have different maxima, made 1000x apart here, and agree on
    the sample's afterwards) and backward (rows of at least 32K elements) of the fused map on 1 and 2
    threads equal the reference."""
    f = rng.randn(*shape)
    f[..., : shape[2] // 3, :] *= 1000.0
    g = rng.randn(shape[0], shape[2], shape[3])
    for p in (2.0, 1.5):
        tag = rng.tag(p=p, shape=shape)
        outs = []
        for threads in (1, 2):
            with num_threads(threads):
                x = f.clone().requires_grad_(True)
                out, scale = torch.ops.distillx.attention_map(x, p)
                outs.append((out.detach(), scale, torch.autograd.grad(out, x, g)[0]))
        want_map, want_scale, want_grad = _unit_map_ref(f, p, g)
        for out, scale, grad in outs:
            close(out, want_map, torch.float32, tag)
            assert torch.equal(scale.to(F64), want_scale), tag
            close(grad, want_grad, torch.float32, tag)


@requires_kernel
def test_opcheck_attention_map(rng):
    cases = ((torch.float32, 2.0, (2, 3, 4, 5)), (F64, 1.5, (1, 4, 3, 3)), (torch.float32, 1.0, (2, 1, 5, 2)),
             (F64, 3.0, (3, 2, 2, 7)))
    for dtype, p, shape in cases:
        f = rng.randn(*shape, dtype=dtype).requires_grad_(True)
        torch.library.opcheck(torch.ops.distillx.attention_map.default, (f, p))
        g = rng.randn(shape[0], shape[2], shape[3], dtype=dtype)
        scale = ref.sample_scale(f)
        torch.library.opcheck(torch.ops.distillx.attention_map_backward.default, (g, f.detach(), scale, p))


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_half_features_read_in_place(rng, dtype):
    """The CPU kernel reads half-precision features itself (no float32 copy of the map): the maps and
    scales are float32 and bitwise those of the float32 kernel on the same values; the gradient is in
    the features' dtype and is the float32 kernel's, rounded. 70x70 > 4096 columns: several blocks."""
    for shape, p in (((2, 3, 5, 7), 2.0), ((1, 4, 70, 70), 1.5), ((3, 1, 1, 1), 3.0)):
        f = rng.randn(*shape, dtype=dtype)
        tag = rng.tag(dtype=dtype, shape=shape, p=p)
        a, scale = torch.ops.distillx.attention_map(f, p)
        a32, scale32 = torch.ops.distillx.attention_map(f.float(), p)
        assert a.dtype == scale.dtype == torch.float32, tag
        assert torch.equal(a, a32) and torch.equal(scale, scale32), tag
        g = rng.randn(shape[0], shape[2], shape[3])
        grad = torch.ops.distillx.attention_map_backward(g, f, scale, p)
        assert grad.dtype == dtype, tag
        assert torch.equal(grad, torch.ops.distillx.attention_map_backward(g, f.float(), scale32, p).to(dtype)), tag
        torch.library.opcheck(torch.ops.distillx.attention_map.default, (f.requires_grad_(True), p))
        torch.library.opcheck(torch.ops.distillx.attention_map_backward.default, (g, f.detach(), scale, p))


@requires_kernel
def test_raw_op_argument_checks(rng):
    with pytest.raises(RuntimeError, match="p must be > 0"):
        torch.ops.distillx.attention_map(rng.randn(1, 2, 3, 3), 0.0)
    with pytest.raises(RuntimeError, match=r"\(B, C, H, W\)"):
        torch.ops.distillx.attention_map(rng.randn(2, 3, 3), 2.0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.distillx.attention_map(rng.randn(1, 2, 3, 3).to(torch.int32), 2.0)
    with pytest.raises(RuntimeError, match="grad_map must have 18 elements"):
        torch.ops.distillx.attention_map_backward(rng.randn(2, 3, 4), rng.randn(2, 2, 3, 3), torch.ones(2), 2.0)
    with pytest.raises(RuntimeError, match=r"scale must have shape \(2,\)"):
        torch.ops.distillx.attention_map_backward(rng.randn(2, 3, 3), rng.randn(2, 2, 3, 3), torch.ones(3), 2.0)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
@requires_kernel
def test_compile_fullgraph(rng):
    """attention_map_loss (p = 2 with pooling of the teacher, p = 1.5 with pooling of the student) under
    torch.compile(fullgraph=True): loss and gradient equal eager and the float64 reference."""
    def fn(f_s, f_t):
        return DF.attention_map_loss(f_s, f_t, 2.0) + DF.attention_map_loss(f_s, f_t[..., :3, :3], 1.5)

    compiled = torch.compile(fn, fullgraph=True)
    for attempt in range(2):
        f_s, f_t = rng.randn(2, 3, 5, 5), rng.randn(2, 4, 10, 10)
        tag = rng.tag(case="compiled attention_map_loss", attempt=attempt)
        got, got_grad = run_loss(compiled, f_s, f_t)
        want, want_grad = run_loss(fn, f_s, f_t)
        close(got, want, torch.float32, tag)
        close(got_grad, want_grad, torch.float32, tag)
        ref_loss, ref_grad = run_ref(lambda a, b: ref.attention_map_loss_reference(a, b, 2.0)
                                     + ref.attention_map_loss_reference(a, b[..., :3, :3], 1.5), f_s, f_t)
        close(got, ref_loss, torch.float32, tag)
        close(got_grad, ref_grad, torch.float32, tag)
        assert got_grad.abs().sum() > 0, tag


# ----------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------
def test_errors_name_the_argument(rng):
    f_s, f_t = rng.randn(2, 3, 4, 4), rng.randn(2, 5, 8, 8)
    with pytest.raises(ValueError, match=r"^f_s must have at least 4 dimension"):
        DF.attention_map_loss(f_s[0], f_t)
    with pytest.raises(ValueError, match=r"^f_t must have at least 4 dimension"):
        DF.attention_map_loss(f_s, f_t[:, 0])
    with pytest.raises(ValueError, match=r"f_s .*\(B, C, H, W\)"):
        DF.attention_map_loss(f_s[None], f_t)
    with pytest.raises(ValueError, match=r"^f_t has batch 1 but f_s has 2"):
        DF.attention_map_loss(f_s, f_t[:1])
    with pytest.raises(TypeError, match=r"^f_s must be a floating-point tensor"):
        DF.attention_map_loss(f_s.int(), f_t)
    with pytest.raises(TypeError, match=r"^f_t must be a floating-point tensor"):
        DF.attention_map_loss(f_s, f_t.long())
    with pytest.raises(TypeError, match=r"^f_t must be a torch.Tensor"):
        DF.attention_map_loss(f_s, None)
    for bad in (0, 0.0, -1.0, -2, float("nan"), float("inf"), True, "2", None):
        with pytest.raises(ValueError, match=r"^p must be a finite number > 0"):
            DF.attention_map_loss(f_s, f_t, p=bad)
