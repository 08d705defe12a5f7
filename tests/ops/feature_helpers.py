"""Helpers shared by the feature-distillation op tests (Gram/KFD, MMD/NST, AT, MiniLM relations).

* runners: the distillx loss on a fresh leaf copy of the student input -> (loss, grad), and the
  float64 reference (:mod:`distillx.ops.reference`) on the very same values -> (loss, grad);
* oracles: kernel matrices written independently of ``reference.kernel_matrix`` (``torch.cdist``,
  ``torch.special.chebyshev_polynomial_t``, explicit pair sums), so the reference itself is checked too.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

F64 = torch.float64

# Built-in kernels with parameter variants: (id, kernel, params, input scale). Inputs of the fixed
# Chebyshev scale are drawn small enough that |x| / scale < 1 (8 standard deviations).
KERNEL_CASES = [
    ("linear", "linear", {}, 1.0),
    ("cosine", "cosine", {}, 1.0),
    ("poly-default", "polynomial", {}, 1.0),
    ("poly-d3-c0", "polynomial", {"degree": 3, "coef0": 0.0}, 1.0),  # negative bases: odd powers
    ("poly-d1-c0.5", "polynomial", {"degree": 1, "coef0": 0.5}, 1.0),
    ("poly-d4-c-0.3", "polynomial", {"degree": 4, "coef0": -0.3}, 1.0),
    ("rbf-default", "rbf", {}, 1.0),
    ("rbf-sigma2", "rbf", {"sigma2": 2.5}, 1.0),
    ("cheb-default", "chebyshev", {}, 1.0),
    ("cheb-o1", "chebyshev", {"order": 1}, 1.0),
    ("cheb-o2-eps", "chebyshev", {"order": 2, "eps": 0.05}, 1.0),
    ("cheb-o4", "chebyshev", {"order": 4}, 1.0),
    ("cheb-scale", "chebyshev", {"scale": 4.0}, 0.5),
    ("cheb-o2-scale", "chebyshev", {"order": 2, "scale": 3.0}, 0.35),
]
KERNEL_IDS = [c[0] for c in KERNEL_CASES]

# Kernels with parameters for which numerical and analytical gradients must agree (no detached,
# data-dependent bandwidth or scale): the gradcheck cases.
GRADCHECK_KERNELS = [
    ("linear", "linear", {}, 1.0),
    ("cosine", "cosine", {}, 1.0),
    ("poly", "polynomial", {"degree": 3, "coef0": 0.5}, 1.0),
    ("rbf-sigma2", "rbf", {"sigma2": 1.7}, 1.0),
    ("cheb-o3-scale", "chebyshev", {"order": 3, "scale": 4.0}, 0.5),
    ("cheb-o1-scale", "chebyshev", {"order": 1, "scale": 3.0, "eps": 0.01}, 0.4),
]
GRADCHECK_IDS = [c[0] for c in GRADCHECK_KERNELS]


@contextmanager
def num_threads(n: int):
    """Run with ``n`` intra-op threads (the op tests default to 1), restoring the count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def dtype_id(d) -> str:
    return str(d).split(".")[-1]


# ----------------------------------------------------------------------------------------------
# Runners
# ----------------------------------------------------------------------------------------------
def run_loss(fn, x, *args, upstream=1.0, **kw):
    """``fn(x_leaf, *args, **kw)`` on a fresh leaf copy of ``x``; returns (loss, grad w.r.t. x) after
    backward with the scalar ``upstream``."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    out.backward(torch.tensor(upstream, dtype=out.dtype))
    return out.detach(), x.grad


def run_ref(fn, x, *args, upstream=1.0, **kw):
    """The float64 reference ``fn`` on the values the op sees: ``x`` and every tensor in ``args``
    converted to float64 (after the rounding to their own dtype); returns (loss, grad w.r.t. x)."""
    x64 = x.detach().to(F64).requires_grad_(True)
    args = [a.detach().to(F64) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    out = fn(x64, *args, **kw)
    (grad,) = torch.autograd.grad(out, x64, torch.tensor(upstream, dtype=F64))
    return out.detach(), grad


def reference_error(ref_fn, x, *args, upstream=1.0, dtype=torch.float32):
    """(|Δloss|, max |Δgrad|) of the reference evaluated in ``dtype`` against itself in float64, on the
    same input values: the rounding error of the straightforward low-precision computation.

    Tests allow a fused op a small multiple of it on top of the dtype's tolerance: where a case is
    ill-conditioned — a row-normalised Gram row dominated by one entry (normalisation's backward
    cancels 1 − n_j²), rows close compared to their norms (rbf distances and the default bandwidth in
    their expanded forms cancel; N = 2 makes the exact gradient 0) — any float32 computation is that
    far off. A real error is orders of magnitude larger; well-conditioned cases leave the tolerance as is."""
    lo = x.detach().to(dtype).requires_grad_(True)
    args_lo = [a.detach().to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    out = ref_fn(lo, *args_lo)
    (grad,) = torch.autograd.grad(out, lo, torch.tensor(upstream, dtype=out.dtype))
    want, want_grad = run_ref(ref_fn, x, *args, upstream=upstream)
    dg = float((grad.to(F64) - want_grad).abs().max()) if grad.numel() else 0.0
    return float((out.detach().to(F64) - want).abs()), dg


def reference_floor(ref_fn, x, *args, upstream=1.0, dtype=torch.float32, factor=16.0) -> tuple[float, float]:
    """``factor`` x the reference's own rounding error (:func:`reference_error`) for a comparison in
    ``dtype``: the (loss, grad) atol floors of an ill-conditioned case. Half inputs are computed in
    float32 by the kernels, so their floor is float32's too.

    float64 has no wider dtype to measure against, and ``reference_error`` in float64 is 0 by
    construction — yet the float64 reference has rounding error of its own, which matters where the
    exact value is 0 and the atol scaled by the expected magnitude is too (rbf with the default σ² on
    N = 2 rows: both sides' kernel values are exp(−1/2), the gradient cancels to 0, and the reference's
    expanded ‖x_i‖² + ‖x_j‖² − 2⟨x_i,x_j⟩ leaves ε·‖x‖²/‖x_i − x_j‖² of it). Rounding error is first order
    in the unit roundoff, so the float64 floor is float32's scaled by the ratio of their epsilons.

    The error is measured twice, on the rows as given and reversed (every scalar loss checked this way is
    invariant to the order of the samples), and the larger one counts: where the exact gradient cancels
    to 0 the rounding left over depends on the summation order, and one order can be lucky."""
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16, F64) else dtype

    def reversed_rows(a, *rest):
        return ref_fn(a.flip(0), *(r.flip(0) if isinstance(r, torch.Tensor) and r.dim() else r for r in rest))

    errors = [reference_error(fn, x, *args, upstream=upstream, dtype=compute) for fn in (ref_fn, reversed_rows)]
    scale = factor * (torch.finfo(F64).eps / torch.finfo(torch.float32).eps if dtype == F64 else 1.0)
    return scale * max(e[0] for e in errors), scale * max(e[1] for e in errors)


# ----------------------------------------------------------------------------------------------
# Independent oracles
# ----------------------------------------------------------------------------------------------
def mean_pair_sq_dist(x: torch.Tensor) -> torch.Tensor:
    """Mean squared distance over ordered pairs i != j (1 when it is 0 or undefined)."""
    n = x.shape[0]
    if n < 2:
        return torch.ones((), dtype=x.dtype)
    d2 = torch.cdist(x.detach(), x.detach()).pow(2)
    v = d2.sum() / (n * (n - 1))
    return v if v > 0 else torch.ones((), dtype=x.dtype)


def oracle_kernel(x, z, kernel, *, degree=2, coef0=1.0, sigma2=None, order=3, eps=1e-3, scale=None,
                  default_from=None):
    """k(x_i, z_j) written from the operator definitions (docstrings of distillx/ops/reference.py). Data-dependent defaults (rbf sigma2,
    Chebyshev scale) are taken from ``default_from`` (detached), which the caller chooses."""
    D = x.shape[1]
    if kernel == "linear":
        return torch.einsum("id,jd->ij", x, z)
    if kernel == "polynomial":
        return (torch.einsum("id,jd->ij", x, z) / D + coef0) ** degree
    if kernel == "cosine":
        nx = x.pow(2).sum(1).sqrt().clamp(min=1e-12)
        nz = z.pow(2).sum(1).sqrt().clamp(min=1e-12)
        return torch.einsum("id,jd->ij", x, z) / nx[:, None] / nz[None, :]
    if kernel == "rbf":
        if sigma2 is None:
            sigma2 = mean_pair_sq_dist(default_from)
        return torch.exp(-torch.cdist(x, z).pow(2) / (2 * sigma2))
    if kernel == "chebyshev":
        if scale is None:
            scale = default_from.detach().abs().max()
        xs, zs = x / scale, z / scale
        acc = torch.zeros(x.shape[0], z.shape[0], dtype=x.dtype)
        for i in range(order + 1):
            acc = acc + torch.einsum("id,jd->ij", torch.special.chebyshev_polynomial_t(xs, i),
                                     torch.special.chebyshev_polynomial_t(zs, i))
        return acc / D / torch.sqrt(1 - torch.einsum("id,jd->ij", xs, zs) / D + eps)
    raise AssertionError(kernel)


def raw_kernel_matrix(code, x, params):
    """k(x_i, x_j) as the raw ops distillx::kernel_gram / kernel_mmd define it on their inputs
    (csrc/include/distillx/kernel_gram.h): 0 linear g; 1 polynomial (a·g + c)^d, params [a, c, d];
    2 rbf exp(−γ‖x_i − x_j‖²), params [γ]; 3 chebyshev on expanded features x = [T_0…T_n],
    g / (D·sqrt(1 − g₁/D + ε)) with g₁ the inner product of the T_1 block (columns [D, 2D)), params [D, ε]."""
    p = [float(v) for v in params]
    g = x @ x.T
    if code == 0:
        return g
    if code == 1:
        return (g * p[0] + p[1]) ** p[2]
    if code == 2:
        n = x.pow(2).sum(1)
        return torch.exp(-p[0] * (n[:, None] + n[None, :] - 2 * g).clamp(min=0))
    D = int(p[0])
    u = x[:, D:2 * D]
    return g / D / torch.sqrt(1 - u @ u.T / D + p[1])


def raw_case(rng, code, n, width, dtype):
    """Random raw-op inputs for kernel ``code``: (x, params, original width). Chebyshev gets the
    expanded features of order 2 of a (n, width) input scaled to [−1, 1]."""
    if code == 0:
        return rng.randn(n, width, dtype=dtype), torch.zeros(0, dtype=F64), width
    if code == 1:
        return rng.randn(n, width, dtype=dtype), torch.tensor([1.0 / width, 0.7, 3.0], dtype=F64), width
    if code == 2:
        return rng.randn(n, width, dtype=dtype), torch.tensor([0.5 / (1.0 + width)], dtype=F64), width
    from distillx.ops.reference import chebyshev_features
    x = chebyshev_features(rng.randn(n, width, dtype=dtype), 2)
    return x, torch.tensor([float(width), 1e-2], dtype=F64), width


def oracle_gram_loss(s, t, kernel, normalize_rows=False, **params):
    """mean_ij (k(s_i,s_j) − k(t_i,t_j))² by explicit loops over rows (tiny N only); each side's
    defaults come from its own rows."""
    N = s.shape[0]
    ks = oracle_kernel(s, s, kernel, default_from=s, **params)
    kt = oracle_kernel(t, t, kernel, default_from=t, **params)
    total = s.new_zeros(())
    for i in range(N):
        a, b = ks[i], kt[i]
        if normalize_rows:
            a = a / a.norm().clamp(min=1e-12)
            b = b / b.norm().clamp(min=1e-12)
        for j in range(N):
            total = total + (a[j] - b[j]) ** 2
    return total / (N * N)


def oracle_mmd(s, t, kernel, **params):
    """Squared MMD with ONE kernel for all three terms: data-dependent defaults from both sets."""
    both = torch.cat([s.detach(), t.detach()])
    def k(a, b):
        return oracle_kernel(a, b, kernel, default_from=both, **params)
    return k(s, s).mean() + k(t, t).mean() - 2 * k(s, t).mean()


def oracle_attention_map_loss(f_s, f_t, p):
    """AT by hand: channel mean of |F|^p, the larger map averaged over PyTorch's adaptive-pooling bins
    (start floor(i·H/h), end ceil((i+1)·H/h)), per-sample L2 normalisation, mean squared difference."""
    def amap(f):
        return f.abs().pow(p).mean(1)

    def pool(a, h, w):
        H, W = a.shape[-2:]
        out = a.new_zeros(a.shape[0], h, w)
        for i in range(h):
            r0, r1 = (i * H) // h, -((-(i + 1) * H) // h)
            for j in range(w):
                c0, c1 = (j * W) // w, -((-(j + 1) * W) // w)
                out[:, i, j] = a[:, r0:r1, c0:c1].mean((-2, -1))
        return out

    a_s, a_t = amap(f_s), amap(f_t)
    h, w = min(a_s.shape[-2], a_t.shape[-2]), min(a_s.shape[-1], a_t.shape[-1])
    a_s, a_t = pool(a_s, h, w).flatten(1), pool(a_t, h, w).flatten(1)
    a_s = a_s / a_s.norm(dim=1, keepdim=True).clamp(min=1e-12)
    a_t = a_t / a_t.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return (a_s - a_t).pow(2).mean()


def oracle_relation_loss(q_s, k_s, q_t, k_t, key_padding_mask=None):
    """MiniLM relation loss by explicit loops over (b, a, query row), a plain-Python softmax/KL per row
    over the valid keys only."""
    B, A, L, ds = q_s.shape
    dt = q_t.shape[-1]
    total, rows = 0.0, 0
    for b in range(B):
        valid = [j for j in range(L) if key_padding_mask is None or bool(key_padding_mask[b, j])]
        for a in range(A):
            for i in valid:
                zs = [float(q_s[b, a, i] @ k_s[b, a, j]) / math.sqrt(ds) for j in valid]
                zt = [float(q_t[b, a, i] @ k_t[b, a, j]) / math.sqrt(dt) for j in valid]
                ms, mt = max(zs), max(zt)
                ls = math.log(sum(math.exp(v - ms) for v in zs))
                lt = math.log(sum(math.exp(v - mt) for v in zt))
                for vs, vt in zip(zs, zt):
                    pt = math.exp(vt - mt - lt)
                    total += pt * ((vt - mt - lt) - (vs - ms - ls))
                rows += 1
    return total / max(rows, 1)
