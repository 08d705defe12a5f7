"""CUDA kernels of the logit-divergence family against the references, on the GPU.

Skipped where no GPU is visible (CI has none); scripts/gpu_check.sh runs them on a lent GPU.
"""
import pytest
import torch

import distillx.ops
from distillx import functional as F
from distillx.ops import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DIVS = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 1.0)]


def _gen(seed):
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    return g


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 33), (3, 4, 1000), (17, 32000), (2, 128256)])
@pytest.mark.parametrize("divergence,beta", DIVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_kd_loss_matches_reference(shape, divergence, beta, dtype):
    seed = hash((shape, divergence, beta, str(dtype))) % 2**31
    g = _gen(seed)
    s = (torch.randn(shape, device="cuda", generator=g) * 3).to(dtype).requires_grad_()
    t = (torch.randn(shape, device="cuda", generator=g) * 3).to(dtype)
    mask = torch.rand(shape[:-1], device="cuda", generator=g) > 0.3
    for m in (None, mask):
        out = F.kd_loss(s, t, 2.0, divergence, beta, "batchmean", m)
        (gs,) = torch.autograd.grad(out, s)
        s64 = s.detach().double().requires_grad_()
        exp = ref.kd_loss_reference(s64, t.double(), 2.0, divergence, beta, "batchmean", m)
        (ge,) = torch.autograd.grad(exp, s64)
        tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 2e-2)
        torch.testing.assert_close(out.double(), exp, rtol=tol, atol=tol, msg=f"seed {seed}")
        torch.testing.assert_close(gs.double(), ge, rtol=tol, atol=tol * 0.1, msg=f"seed {seed}")


@pytest.mark.parametrize("divergence,beta", DIVS[:3])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_float64(divergence, beta, masked):
    s = torch.randn(4, 9, dtype=torch.float64, device="cuda", requires_grad=True)
    t = torch.randn(4, 9, dtype=torch.float64, device="cuda")
    m = torch.tensor([True, False, True, True], device="cuda") if masked else None
    assert torch.autograd.gradcheck(lambda x: F.kd_loss(x, t, 1.7, divergence, beta, "batchmean", m), (s,))
    hs = torch.randn(5, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    ws = torch.randn(9, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    bs = torch.randn(9, dtype=torch.float64, device="cuda", requires_grad=True)
    ht, wt = torch.randn(5, 4, dtype=torch.float64, device="cuda"), torch.randn(9, 4, dtype=torch.float64, device="cuda")
    lm = m if m is None else torch.tensor([True, False, True, True, True], device="cuda")
    for red in ("batchmean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b, c: F.linear_kd_loss(a, b, ht, wt, c, None, 1.3, divergence, beta, red, lm, chunk_size=2),
            (hs, ws, bs))


def test_opcheck_cuda():
    s = torch.randn(5, 11, device="cuda", requires_grad=True)
    t = torch.randn(5, 11, device="cuda")
    w = torch.tensor([1.0, 0, 1, 1, 0], device="cuda")
    for cg in (True, False):
        torch.library.opcheck(torch.ops.distillx.logit_divergence.default, (s, t, w, 2.0, 2, 0.3, cg))
    hs = torch.randn(6, 8, device="cuda", requires_grad=True)
    ws = torch.randn(11, 8, device="cuda", requires_grad=True)
    bs = torch.randn(11, device="cuda", requires_grad=True)
    ht, wt, bt = torch.randn(6, 5, device="cuda"), torch.randn(11, 5, device="cuda"), torch.randn(11, device="cuda")
    for cg in (True, False):
        torch.library.opcheck(torch.ops.distillx.linear_divergence.default, (hs, ws, bs, ht, wt, bt, None, 2.0, 0, 0.5, 4, cg))


def test_compile_fullgraph_cuda():
    s = torch.randn(8, 100, device="cuda", requires_grad=True)
    t = torch.randn(8, 100, device="cuda")
    f = torch.compile(lambda a, b: F.kd_loss(a, b, 2.0, "jsd") * 3, fullgraph=True)
    out = f(s, t)
    (g1,) = torch.autograd.grad(out, s)
    exp = ref.kd_loss_reference(s, t, 2.0, "jsd") * 3
    (g2,) = torch.autograd.grad(exp, s)
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_reference(dtype):
    g = _gen(7)
    N, Hs, Ht, C = 300, 64, 96, 5003
    hs = torch.randn(N, Hs, device="cuda", generator=g).to(dtype).requires_grad_()
    ws = (torch.randn(C, Hs, device="cuda", generator=g) * 0.1).to(dtype).requires_grad_()
    bs = torch.randn(C, device="cuda", generator=g).to(dtype).requires_grad_()
    ht = torch.randn(N, Ht, device="cuda", generator=g).to(dtype)
    wt = (torch.randn(C, Ht, device="cuda", generator=g) * 0.1).to(dtype)
    out = F.linear_kd_loss(hs, ws, ht, wt, bs, None, 2.0, chunk_size=64)
    grads = torch.autograd.grad(out, (hs, ws, bs))
    leaves = [x.detach().double().requires_grad_() for x in (hs, ws, bs)]
    exp = ref.linear_kd_loss_reference(leaves[0], leaves[1], ht.double(), wt.double(), leaves[2], None, 2.0)
    exp_grads = torch.autograd.grad(exp, leaves)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), exp, rtol=tol, atol=tol)
    for a, b in zip(grads, exp_grads):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * abs(b).max().item())


def test_numerics_cuda():
    s = torch.tensor([[1e4, -1e4, 0.0, float("-inf")]], device="cuda", requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 5.0, float("-inf")]], device="cuda")
    for div in ("kl", "reverse_kl", "jsd"):
        out = F.kd_loss(s, t, 1.0, div)
        (gs,) = torch.autograd.grad(out, s)
        exp = ref.kd_loss_reference(s.double(), t.double(), 1.0, div)
        assert torch.isfinite(out) and torch.isfinite(gs).all()
        torch.testing.assert_close(out.double(), exp, rtol=1e-5, atol=1e-3)
        assert gs[0, 3] == 0
    none = torch.zeros(3, dtype=torch.bool, device="cuda")
    s2 = torch.full((3, 5), float("nan"), device="cuda", requires_grad=True)
    out = F.kd_loss(s2, torch.randn(3, 5, device="cuda"), mask=none)
    (g2,) = torch.autograd.grad(out, s2)
    assert out.item() == 0 and (g2 == 0).all()


def test_mixed_devices_raise():
    s = torch.randn(2, 3, device="cuda", requires_grad=True)
    with pytest.raises(ValueError, match="teacher_logits"):
        F.kd_loss(s, torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.distillx.logit_divergence(s, torch.randn(2, 3), None, 1.0, 0, 0.5, True)


def test_cuda_served_by_kernel_not_fallback():
    assert distillx.ops.backend("logit_divergence", "cuda") == "compiled"
    assert distillx.ops.backend("linear_divergence", "cuda") == "compiled"


def test_current_stream_is_used():
    s = torch.randn(64, 4096, device="cuda", requires_grad=True)
    t = torch.randn(64, 4096, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = F.kd_loss(s, t, 2.0)
        (gs,) = torch.autograd.grad(out, s)
    torch.cuda.current_stream().wait_stream(side)
    exp = ref.kd_loss_reference(s, t, 2.0)
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-6)
