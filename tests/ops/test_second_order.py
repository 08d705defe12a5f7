"""Higher-order gradients through the compiled ops: exact, or a clear error, never a silent zero.

A backward with ``create_graph=True`` (Hessian-vector products, gradient penalties) through
``linear_kd_loss``, ``kernel_gram_loss``, ``mmd_loss``, ``attention_map_loss`` and
``attention_relation_loss`` and ``kd_loss`` gives the references' second derivatives (the forward
still runs the kernel). ``torch.func`` transforms (grad, hessian, vmap) work on every op: they run
the reference.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from distillx import _ext
from distillx import functional as DF
from distillx.ops import reference as ref

from .test_registry import Dispatched

pytestmark = pytest.mark.skipif(not _ext.available(), reason="distillx._C not built: nothing compiled to check")

F64 = torch.float64


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    return randn


def cases():
    """name -> (op that must serve the forward, functional call, reference call, the student input)."""
    r = _inputs(0)
    ws, bs, ht, wt = r(7, 5), r(7), r(6, 4), r(7, 4)
    t_rows, t_mmd = r(9, 4), r(7, 6)
    f_t, q_t, k_t, k_s = r(2, 5, 2, 2), r(2, 2, 5, 4), r(2, 2, 5, 4), r(2, 2, 5, 3)
    mask = torch.tensor([True, False, True, True, True, False])
    s_t, kd_mask = r(6, 5), torch.tensor([True, True, False, True, True, True])
    out = {
        "kd-kl": ("logit_divergence", lambda x: DF.kd_loss(x, s_t, temperature=2.0),
                  lambda x: ref.kd_loss_reference(x, s_t, 2.0), r(6, 5)),
        "kd-jsd-masked": ("logit_divergence", lambda x: DF.kd_loss(x, s_t, 3.0, "jsd", 0.3, "sum", mask=kd_mask),
                          lambda x: ref.kd_loss_reference(x, s_t, 3.0, "jsd", 0.3, "sum", mask=kd_mask), r(6, 5)),
        "kd-reverse-none": ("logit_divergence",
                            lambda x: DF.kd_loss(x, s_t, 2.0, "reverse_kl", reduction="none").pow(2).sum(),
                            lambda x: ref.kd_loss_reference(x, s_t, 2.0, "reverse_kl", reduction="none").pow(2).sum(),
                            r(6, 5)),
        "linear_kd-jsd": ("linear_divergence", lambda x: DF.linear_kd_loss(x, ws, ht, wt, bs, temperature=2.0,
                                                                           divergence="jsd", mask=mask),
                          lambda x: ref.linear_kd_loss_reference(x, ws, ht, wt, bs, None, 2.0, "jsd", mask=mask), r(6, 5)),
        "linear_kd-none": ("linear_divergence",
                           lambda x: DF.linear_kd_loss(x, ws, ht, wt, bs, reduction="none").pow(2).sum(),
                           lambda x: ref.linear_kd_loss_reference(x, ws, ht, wt, bs, reduction="none").pow(2).sum(),
                           r(6, 5)),
        "attention_map": ("attention_map", lambda x: DF.attention_map_loss(x, f_t, 2.0),
                          lambda x: ref.attention_map_loss_reference(x, f_t, 2.0), r(2, 3, 4, 4)),
        "relation-q-is-k": ("attention_relation_fused", lambda x: DF.attention_relation_loss(x, x, q_t, k_t),
                            lambda x: ref.attention_relation_loss_reference(x, x, q_t, k_t), r(2, 2, 5, 3)),
        "relation-q-k": ("attention_relation_fused", lambda x: DF.attention_relation_loss(x, k_s, q_t, k_t),
                         lambda x: ref.attention_relation_loss_reference(x, k_s, q_t, k_t), r(2, 2, 5, 3)),
    }
    for kernel in ("polynomial", "rbf", "chebyshev"):
        for rows in (False, True):
            out[f"gram-{kernel}-{'sp' if rows else 'plain'}"] = (
                "kernel_gram", lambda x, k=kernel, n=rows: DF.kernel_gram_loss(x, t_rows, k, normalize_rows=n),
                lambda x, k=kernel, n=rows: ref.kernel_gram_loss_reference(x, t_rows, k, n), r(9, 6))
        out[f"mmd-{kernel}"] = ("kernel_mmd", lambda x, k=kernel: DF.mmd_loss(x, t_mmd, k),
                                lambda x, k=kernel: ref.mmd_loss_reference(x, t_mmd, k), r(9, 6))
    return out


CASES = cases()


def hvp(loss, x, v):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(x), x, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), x)
    return g.detach(), h


@pytest.mark.parametrize("name", list(CASES))
def test_hessian_vector_products_match_the_reference(name):
    op, fused, reference, x = CASES[name]
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    with Dispatched() as mode:
        g, h = hvp(fused, x, v)
    assert op in mode.ops, f"the kernel did not serve {name}: {mode.ops}"
    g_ref, h_ref = hvp(reference, x, v)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
    assert h_ref.abs().max() > 1e-3, "the reference's Hessian term is not negligible: the check can fail"
    torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-12)


_T_ROWS, _T_MMD = _inputs(5)(9, 4), _inputs(6)(7, 6)
# rbf's default σ² and Chebyshev's default scale come from the batch, detached: finite differences
# would see them move, so gradgradcheck fixes them.
FIXED = {
    "gram-rbf": lambda x: DF.kernel_gram_loss(x, _T_ROWS, "rbf", sigma2=3.0),
    "gram-chebyshev-sp": lambda x: DF.kernel_gram_loss(x, _T_ROWS, "chebyshev", normalize_rows=True, scale=4.0),
    "mmd-rbf": lambda x: DF.mmd_loss(x, _T_MMD, "rbf", sigma2=5.0),
}


@pytest.mark.parametrize("name", ["kd-kl", "kd-jsd-masked", "kd-reverse-none", "linear_kd-jsd", "linear_kd-none", "attention_map", "relation-q-k",
                                  "relation-q-is-k", "gram-polynomial-sp", "mmd-polynomial", *FIXED])
def test_gradgradcheck(name):
    fused, x = (FIXED[name], _inputs(7)(9, 6)) if name in FIXED else CASES[name][1::2]
    assert torch.autograd.gradgradcheck(fused, (x.detach().clone().requires_grad_(True),))


def test_a_gradient_penalty_through_attention_map_loss_trains_the_right_way():
    """A gradient-norm penalty (create_graph, then backward again): the same parameter gradient as the reference."""
    _, fused, reference, x = CASES["attention_map"]
    grads = []
    for loss in (fused, reference):
        leaf = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
        (p,) = torch.autograd.grad(g.pow(2).sum(), leaf)
        grads.append(p)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def _kd(x, t=_inputs(3)(4, 5)):
    return DF.kd_loss(x, t, temperature=2.0, divergence="reverse_kl")


def _kd_ref(x, t=_inputs(3)(4, 5)):
    return ref.kd_loss_reference(x, t, 2.0, "reverse_kl")


@pytest.mark.parametrize("name", ["kd"] + list(CASES))
def test_torch_func_transforms_run_the_reference(name):
    fused, reference, x = (_kd, _kd_ref, _inputs(4)(4, 5)) if name == "kd" else CASES[name][1:]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "running the reference" warning: the intended path
        g = torch.func.grad(fused)(x)
        h = torch.func.hessian(fused)(x)
        batched = torch.func.vmap(fused)(torch.stack([x, 2 * x]))
    torch.testing.assert_close(g, torch.func.grad(reference)(x), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(h, torch.func.hessian(reference)(x), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(batched, torch.stack([reference(x), reference(2 * x)]), rtol=1e-9, atol=1e-12)
