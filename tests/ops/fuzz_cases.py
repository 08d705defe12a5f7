"""Fuzz cases of the distillx.functional ops: a case is a plain dict (shapes, dtype, memory layouts,
masks, parameters and the ``seed`` of its values), so a failing one prints in full and can be copied
as is into the regression list of ``test_fuzz_regressions.py``. ``CHECKS[op](case)`` builds the
inputs and compares the compiled op with the pure-PyTorch reference in float64, evaluated on the very
same (rounded) input values: loss and gradients w.r.t. the student inputs, with the tolerances of
``conftest.TOL``. No hypothesis here: the regression tests run without it.
"""
from __future__ import annotations

import math

import torch

import distillx.functional as DF
from distillx.ops import reference as ref

from .conftest import F64, HALF, close, reference_kd, reference_linear
from .feature_helpers import reference_floor, run_ref

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Memory layouts of an input, all holding the values drawn for it: "transposed" stores the last two
# dims swapped (channels-last for 4-D maps), "sliced" is every other element of a larger buffer at an
# offset, "expanded"/"expanded_last" repeat one slice along dim 0 / the last dim with stride 0.
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "expanded_last")
MASKS = ("none", "random", "all_true", "all_false", "one_false")


class Values:
    """Input values of one case: float64 normal draws from ``torch.Generator(seed)``, rounded to the dtype."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def tensor(self, shape, dtype, layout="contiguous", scale=1.0) -> torch.Tensor:
        return self._draw(shape, dtype, layout, lambda base: torch.randn(base, generator=self.gen, dtype=F64) * scale)

    def grid(self, shape, dtype, layout="contiguous", scale=None) -> torch.Tensor:
        """Values k/4, k in -4..4 (``scale`` is ignored): products are multiples of 1/16 up to 1, so a
        dot product of up to 9 of them plus one more such value needs at most 8 significant bits and
        is exact in bfloat16, float16 and wider, whatever the order of the sums."""
        return self._draw(shape, dtype, layout, lambda base: torch.randint(-4, 5, base, generator=self.gen) / 4)

    def _draw(self, shape, dtype, layout, sample) -> torch.Tensor:
        shape = tuple(shape)
        base = list(shape)
        if layout == "expanded" and shape:
            base[0] = 1
        if layout == "expanded_last" and shape:
            base[-1] = 1
        x = sample(tuple(base)).to(dtype)
        return with_layout(x.expand(shape) if layout.startswith("expanded") else x, layout)

    def mask(self, shape, kind) -> torch.Tensor | None:
        """A bool mask of ``kind``: "random" keeps each entry with probability 0.6 (possibly none),
        "one_false" drops everything along the last dim of the first index (a whole padded sequence)."""
        if kind == "none":
            return None
        m = torch.rand(tuple(shape), generator=self.gen) < 0.6
        if kind == "all_true":
            m[...] = True
        elif kind == "all_false":
            m[...] = False
        elif kind == "one_false":
            m[...] = True
            if m.dim():
                m[0] = False
        return m

    def scalar(self) -> float:
        """An upstream gradient in [1, 3): away from 0, so it scales the gradient without hiding it."""
        return 1.0 + 2.0 * float(torch.rand((), generator=self.gen, dtype=F64))


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x``'s values in another memory layout (same shape and values; only the strides differ)."""
    if layout == "transposed" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced" and x.dim() >= 1:
        big = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1] + 1)
        big[..., 1::2] = x
        return big[..., 1::2]
    return x


def leaf(x: torch.Tensor) -> torch.Tensor:
    """A leaf with ``x``'s values *and strides* (``clone()`` would make an expanded tensor contiguous)."""
    return x.detach().requires_grad_(True)


def close_or_overflow(actual, expected, dtype, msg, **kw) -> None:
    """:func:`close`, except where the float64 value lies beyond the dtype's range: there the op must
    give an infinity (or a value near the range's end) of the right sign, as rounding it does. A
    Chebyshev kernel near its singular diagonal has gradients ~1e7, past float16's 65504."""
    expected = expected.detach().to(F64).reshape(actual.shape)
    actual = actual.detach().to(F64)
    big = expected.abs() > torch.finfo(dtype).max
    if big.any():
        a, e = actual[big], expected[big]
        assert bool(((a.sign() == e.sign()) & (a.abs() >= torch.finfo(dtype).max / 2)).all()), \
            f"{msg}\nbeyond the {dtype} range: expected {e.tolist()}, got {a.tolist()}"
        actual, expected = actual[~big], expected[~big]
    close(actual, expected, dtype, msg, **kw)


# ----------------------------------------------------------------------------------------------
# Logit distillation
# ----------------------------------------------------------------------------------------------
def check_kd_loss(case: dict) -> None:
    """kd_loss: any leading shape (incl. none: one row), row masks of the leading shape or flattened."""
    v, dtype = Values(case["seed"]), DTYPES[case["dtype"]]
    shape = tuple(case["rows"]) + (case["classes"],)
    s = v.tensor(shape, dtype, case["s_layout"], case["scale"])
    t = v.tensor(shape, DTYPES[case["t_dtype"]], case["t_layout"], case["scale"])
    rows = tuple(case["rows"])
    mask = v.mask((math.prod(rows),) if case["flat_mask"] else rows, case["mask"])
    kw = dict(temperature=case["temperature"], divergence=case["divergence"], beta=case["beta"],
              reduction=case["reduction"], mask=mask)
    out_shape = rows if case["reduction"] == "none" else ()
    upstream = v.tensor(out_shape, dtype, scale=1.0)
    x = leaf(s)
    loss = DF.kd_loss(x, t, **kw)
    loss.backward(upstream.to(loss.dtype))
    want, want_grad = reference_kd(s, t, upstream, **kw)
    tag = f"kd_loss {case}"
    assert loss.dtype == dtype and loss.shape == out_shape, tag
    assert x.grad.shape == s.shape, tag
    T = case["temperature"]
    summed = math.prod(rows) if case["reduction"] == "sum" else 1
    close(loss, want, dtype, f"loss {tag}", magnitude=T * T * summed)
    close(x.grad, want_grad, dtype, f"grad {tag}", magnitude=T)


def check_linear_kd_loss(case: dict) -> None:
    """linear_kd_loss: gradients w.r.t. student hidden, weight and bias; the half-precision allowance
    is test_linear_kd_loss's model of the kernel's rounding of its logits chunk."""
    v, dtype = Values(case["seed"]), DTYPES[case["dtype"]]
    t_dtype = DTYPES[case["t_dtype"]]
    rows, C, hs_dim, ht_dim = tuple(case["rows"]), case["classes"], case["hs"], case["ht"]
    hs = v.tensor(rows + (hs_dim,), dtype, case["hs_layout"])
    ws = v.tensor((C, hs_dim), dtype, case["ws_layout"], 2.0 / math.sqrt(hs_dim))
    bs = v.tensor((C,), dtype, scale=0.5) if case["s_bias"] else None
    # A half-precision teacher, or one less precise than the student: its logits are defined only to
    # its own rounding, which depends on the summation order (the CPU kernel multiplies in float32 and
    # rounds once, a half-precision F.linear of width 1 rounds product and sum apart: one bfloat16
    # ulp, amplified by 1/T). Values on a grid make every teacher logit exact in any order, so both
    # sides see the same teacher logits.
    draw = v.grid if t_dtype in HALF or torch.finfo(t_dtype).eps > torch.finfo(dtype).eps else v.tensor
    ht = draw(rows + (ht_dim,), t_dtype, case["ht_layout"])
    wt = draw((C, ht_dim), t_dtype, case["wt_layout"], 2.0 / math.sqrt(ht_dim))
    bt = draw((C,), t_dtype, scale=0.5) if case["t_bias"] else None
    mask = v.mask(rows, case["mask"])
    kw = dict(temperature=case["temperature"], divergence=case["divergence"], beta=case["beta"],
              reduction=case["reduction"], mask=mask)
    out_shape = rows if case["reduction"] == "none" else ()
    upstream = v.tensor(out_shape, dtype)
    leaves = [None if x is None else leaf(x) for x in (hs, ws, bs)]
    loss = DF.linear_kd_loss(leaves[0], leaves[1], ht, wt, leaves[2], bt, chunk_size=case["chunk_size"], **kw)
    loss.backward(upstream.to(loss.dtype))
    inputs = (hs, ws, bs, ht, wt, bt)
    want, want_grads = reference_linear(*inputs, upstream, **kw)
    tag = f"linear_kd_loss {case}"
    assert loss.dtype == dtype and loss.shape == out_shape, tag
    T, n = case["temperature"], math.prod(rows)
    spread = max(1.0, (C / 16) ** 0.5) * (max(1.0, 1.0 / T) if dtype in HALF else 1.0)
    floors = [0.0] * 4
    if dtype in HALF:
        model, model_grads = reference_linear(*inputs, upstream, model_rounding=True, **kw)
        floors = [4 * float((a - b).abs().max()) if a is not None else 0.0
                  for a, b in zip((model, *model_grads), (want, *want_grads))]
    close(loss, want, dtype, f"loss {tag}", atol_floor=floors[0],
          magnitude=T * T * (n if case["reduction"] == "sum" else 1) * (1.0 / T if T < 1 and dtype in HALF else 1.0))
    for name, x, w, floor in zip(("student_hidden", "student_weight", "student_bias"), leaves, want_grads, floors[1:]):
        if x is not None:
            assert x.grad is not None and x.grad.shape == x.shape, f"{name} {tag}"
            close(x.grad, w, dtype, f"grad {name} {tag}", magnitude=T * spread, atol_floor=floor)


# ----------------------------------------------------------------------------------------------
# Feature distillation
# ----------------------------------------------------------------------------------------------
def _check_scalar_loss(name, fn, ref_fn, s, others, dtype, upstream, case, magnitude=1.0, floors=True,
                       extra_floor=(0.0, 0.0)):
    """``fn(s_leaf, *others)`` against ``ref_fn`` in float64 on the same values (gradient w.r.t. s);
    ``extra_floor`` adds to the measured floors (a bound where the reference can be exact by luck)."""
    x = leaf(s)
    loss = fn(x, *others)
    loss.backward(torch.tensor(upstream, dtype=loss.dtype))
    want, want_grad = run_ref(ref_fn, s, *others, upstream=upstream)
    tag = f"{name} {case}"
    assert loss.dtype == dtype and loss.shape == (), tag
    assert x.grad.shape == s.shape, tag
    dl, dg = reference_floor(ref_fn, s, *others, upstream=upstream, dtype=dtype) if floors else (0.0, 0.0)
    dl, dg = dl + extra_floor[0], dg + extra_floor[1]
    close_or_overflow(loss, want, dtype, f"loss {tag}", magnitude=magnitude, atol_floor=dl)
    close_or_overflow(x.grad, want_grad, dtype, f"grad {tag}", magnitude=upstream * magnitude, atol_floor=dg)


def _kernel_params(case: dict) -> dict:
    params = dict(case["params"])
    if case["kernel"] == "chebyshev" and params.get("scale") is not None:
        params["scale"] = params["scale"] * case["scale"]  # stored relative to the inputs' scale
    return params


def _gram_rounding_bound(s, t, kernel, params, dtype, upstream) -> tuple[float, float]:
    """First-order bound of what rounding D = K_s − K_t costs: |ΔD_ij| ≤ ε(|K_s,ij| + |K_t,ij|), so
    |Δloss| ≤ ε mean(2|D|(|K_s|+|K_t|) + 4(|K_s|+|K_t|)²) (the second term: the linear kernel's
    feature-space identity ‖SᵀS‖² + ‖TᵀT‖² − 2‖SᵀT‖² cancels terms of size K² where D is small) and |Δ∂loss/∂s_i| ≤ 2ε/N² Σ_j (|K_s|+|K_t|)_ij |∂K_s,ij/∂s_i| (summed
    over both row and column). Near the Chebyshev kernel's singular diagonal (scaled rows of ±1 only) the
    two sides cancel exactly in the reference while any float32 computation leaves ε·|K|, which
    ∂K ~ 1/ε_kernel^1.5 amplifies: the measured reference error alone can be 0 there."""
    eps = torch.finfo(torch.float32 if dtype != F64 else F64).eps
    x = s.detach().to(F64).reshape(s.shape[0], -1).requires_grad_(True)
    z = t.detach().to(F64).reshape(t.shape[0], -1)
    ks = ref.kernel_matrix(x, x, kernel, **params) if kernel != "cosine" else ref.kernel_matrix(x, x, "cosine")
    kt = ref.kernel_matrix(z, z, kernel, **params) if kernel != "cosine" else ref.kernel_matrix(z, z, "cosine")
    w = (ks.abs() + kt.abs()).detach()
    n = x.shape[0]
    dl = float((2 * (ks - kt).abs() * w + 4 * w ** 2).mean()) * eps
    rows = [torch.autograd.grad(ks.reshape(-1)[k], x, retain_graph=True)[0].abs() for k in range(ks.numel())]
    dg = float((sum(w.reshape(-1)[k] * rows[k] for k in range(len(rows))) * 2 / n ** 2).max()) * eps
    return dl * abs(upstream), dg * abs(upstream)


def check_kernel_gram_loss(case: dict) -> None:
    """kernel_gram_loss: (N, Ds...) against (N, Dt...), extra dims flattened, every built-in kernel."""
    v, dtype = Values(case["seed"]), DTYPES[case["dtype"]]
    s = v.tensor(case["s_shape"], dtype, case["s_layout"], case["scale"])
    t = v.tensor(case["t_shape"], dtype, case["t_layout"], case["scale"])
    kernel, rows, params = case["kernel"], case["normalize_rows"], _kernel_params(case)

    def fn(a, b):
        return DF.kernel_gram_loss(a, b, kernel, rows, **params)

    def ref_fn(a, b):
        return ref.kernel_gram_loss_reference(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), kernel, rows,
                                              **params)

    upstream = v.scalar()
    _check_scalar_loss("kernel_gram_loss", fn, ref_fn, s, (t,), dtype, upstream, case,
                       extra_floor=_gram_rounding_bound(s, t, kernel, params, dtype, upstream))


def check_mmd_loss(case: dict) -> None:
    """mmd_loss: (N, D) against (M, D), every built-in kernel."""
    v, dtype = Values(case["seed"]), DTYPES[case["dtype"]]
    s = v.tensor((case["n"], case["width"]), dtype, case["s_layout"], case["scale"])
    t = v.tensor((case["m"], case["width"]), dtype, case["t_layout"], case["scale"])
    kernel, params = case["kernel"], _kernel_params(case)

    def fn(a, b):
        return DF.mmd_loss(a, b, kernel, **params)

    def ref_fn(a, b):
        return ref.mmd_loss_reference(a, b, kernel, **params)

    upstream = v.scalar()
    _check_scalar_loss("mmd_loss", fn, ref_fn, s, (t,), dtype, upstream, case,
                       extra_floor=(0.0, _cosine_rounding_bound(s, kernel, dtype, upstream)))


def _cosine_rounding_bound(s, kernel, dtype, upstream) -> float:
    """∂cos(x, y)/∂x = y/(‖x‖‖y‖) − cos·x/‖x‖² is a difference of two terms of size 1/‖x‖ that cancel
    exactly where x ∥ y (always when D = 1): the float64 reference gets 0, any float32 computation
    ε/‖x‖ per pair. The MMD gradient of row i sums 2/N² of them over the student rows (row and column)
    and 2/(NM) over the teacher rows: |Δg_i| ≤ 8ε/(N‖s_i‖), with 4x for the rounding of the terms."""
    if kernel != "cosine":
        return 0.0
    eps = torch.finfo(torch.float32 if dtype != F64 else F64).eps
    norms = s.detach().to(F64).reshape(s.shape[0], -1).norm(dim=1)
    smallest = float(norms.min()) if norms.numel() else 1.0
    return 4 * 8 * eps / (s.shape[0] * max(smallest, 1e-30)) * abs(upstream)


def check_attention_map_loss(case: dict) -> None:
    """attention_map_loss: (B, Cs, Hs, Ws) against (B, Ct, Ht, Wt), either map pooled to the other."""
    v, dtype = Values(case["seed"]), DTYPES[case["dtype"]]
    f_s = v.tensor(case["s_shape"], dtype, case["s_layout"])
    f_t = v.tensor(case["t_shape"], dtype, case["t_layout"], 2.0)
    p = case["p"]

    def fn(a, b):
        return DF.attention_map_loss(a, b, p)

    def ref_fn(a, b):
        return ref.attention_map_loss_reference(a, b, p)

    _check_scalar_loss("attention_map_loss", fn, ref_fn, f_s, (f_t,), dtype, v.scalar(), case)


def check_attention_relation_loss(case: dict) -> None:
    """attention_relation_loss: gradients w.r.t. q_s and k_s (one leaf for ``k is q`` self-relations),
    key padding masks including fully padded sequences."""
    v, dtype = Values(case["seed"]), DTYPES[case["dtype"]]
    B, A, L, ds, dt = (case[k] for k in ("B", "A", "L", "ds", "dt"))
    q_s = v.tensor((B, A, L, ds), dtype, case["q_layout"], 1.5)
    k_s = v.tensor((B, A, L, ds), dtype, case["k_layout"], 1.5)
    q_t = v.tensor((B, A, L, dt), dtype, case["t_layout"], 1.5)
    k_t = v.tensor((B, A, L, dt), dtype, "contiguous", 1.5)
    mask = v.mask((B, L), case["mask"])
    upstream = v.scalar()
    same = case["self_relation"]
    q = leaf(q_s)
    k = q if same else leaf(k_s)
    loss = DF.attention_relation_loss(q, k, q_t, q_t if same else k_t, mask)
    leaves = (q,) if same else (q, k)
    grads = torch.autograd.grad(loss, leaves, torch.tensor(upstream, dtype=loss.dtype))
    q64 = q_s.detach().to(F64).requires_grad_(True)
    k64 = q64 if same else k_s.detach().to(F64).requires_grad_(True)
    qt64 = q_t.to(F64)
    want = ref.attention_relation_loss_reference(q64, k64, qt64, qt64 if same else k_t.to(F64), mask)
    want_grads = torch.autograd.grad(want, (q64,) if same else (q64, k64), torch.tensor(upstream, dtype=F64))
    tag = f"attention_relation_loss {case}"
    assert loss.dtype == dtype and loss.shape == (), tag
    close(loss, want, dtype, f"loss {tag}")
    for g, w in zip(grads, want_grads):
        assert g.shape == w.shape and bool(torch.isfinite(g).all()), tag
        close(g, w, dtype, f"grad {tag}", magnitude=upstream)


CHECKS = {
    "kd_loss": check_kd_loss,
    "linear_kd_loss": check_linear_kd_loss,
    "kernel_gram_loss": check_kernel_gram_loss,
    "mmd_loss": check_mmd_loss,
    "attention_map_loss": check_attention_map_loss,
    "attention_relation_loss": check_attention_relation_loss,
}
