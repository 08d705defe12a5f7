"""CUDA kernels of kernel_gram, kernel_mmd, attention_map and attention_relation against the float64
references, on the GPU.

Skipped where no GPU is visible (CI has none); scripts/gpu_check.sh runs them on a lent GPU.
"""
import pytest
import torch

import distillx.functional as DF
from distillx.ops import has_kernel
from distillx.ops import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

KERNELS = [("polynomial", {"degree": 3, "coef0": 0.5}), ("rbf", {}), ("rbf", {"sigma2": 0.7}),
           ("chebyshev", {"order": 3, "scale": 4.0}), ("linear", {}), ("cosine", {})]


def _inputs(seed, shapes, dtype=torch.float32):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(s, device="cuda", generator=g, dtype=dtype) for s in shapes]


def _grad(fn, s, t):
    s = s.detach().clone().requires_grad_(True)
    out = fn(s, t)
    (g,) = torch.autograd.grad(out, s)
    return out.detach(), g


@pytest.mark.parametrize("op", ["kernel_gram", "kernel_mmd", "attention_map", "attention_map_backward",
                                "attention_relation", "attention_relation_backward"])
def test_kernels_are_registered(op):
    assert has_kernel(op, "cuda"), f"distillx::{op} has no CUDA kernel in this build"


@pytest.mark.parametrize("kernel,params", KERNELS, ids=[k + str(i) for i, (k, _) in enumerate(KERNELS)])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("N", [1, 7, 300, 1100])
def test_gram_matches_reference(kernel, params, normalize, N):
    s, t = _inputs(N * 7 + len(kernel), [(N, 13), (N, 29)])
    loss, grad = _grad(lambda a, b: DF.kernel_gram_loss(a, b, kernel, normalize, **params), s, t)
    want, want_grad = _grad(lambda a, b: ref.kernel_gram_loss_reference(a, b, kernel, normalize, **params),
                            s.double(), t.double())
    assert loss.device.type == "cuda" and grad.device.type == "cuda"
    torch.testing.assert_close(loss.double(), want, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=2e-3, atol=2e-4 * float(want_grad.abs().max()) + 1e-7)


@pytest.mark.parametrize("kernel,params", KERNELS[:4], ids=[k + str(i) for i, (k, _) in enumerate(KERNELS[:4])])
@pytest.mark.parametrize("N,M", [(1, 1), (5, 9), (700, 300)])
def test_mmd_matches_reference(kernel, params, N, M):
    s, t = _inputs(N + M, [(N, 11), (M, 11)])
    loss, grad = _grad(lambda a, b: DF.mmd_loss(a, b, kernel, **params), s, t)
    want, want_grad = _grad(lambda a, b: ref.mmd_loss_reference(a, b, kernel, **params), s.double(), t.double())
    torch.testing.assert_close(loss.double(), want, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=2e-3, atol=2e-4 * float(want_grad.abs().max()) + 1e-7)


def test_gram_gradcheck_float64():
    s, t = _inputs(3, [(9, 4), (9, 6)], torch.float64)
    s.requires_grad_(True)
    for kernel, params in KERNELS[:4]:
        for normalize in (False, True):
            assert torch.autograd.gradcheck(lambda x: DF.kernel_gram_loss(x, t, kernel, normalize, **params), (s,))
    assert torch.autograd.gradcheck(lambda x: DF.mmd_loss(x, t[:, :4], "rbf", sigma2=1.3), (s,))


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 0.5])
@pytest.mark.parametrize("shapes", [((2, 3, 8, 8), (2, 5, 8, 8)), ((4, 16, 32, 32), (4, 64, 16, 16))])
def test_attention_map_matches_reference(p, shapes):
    fs, ft = _inputs(int(p * 10), shapes)
    loss, grad = _grad(lambda a, b: DF.attention_map_loss(a, b, p=p), fs, ft)
    want, want_grad = _grad(lambda a, b: ref.attention_map_loss_reference(a, b, p), fs.double(), ft.double())
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_attention_map_subnormal_features(dtype):
    """Samples of subnormal magnitude (max |F| = 1e-39, 1e-309 in float64; the build's fast math flushes
    float subnormals to zero, and 1/max|F| overflows) on the student side, the teacher side, and one
    among normal ones: loss and gradient finite and equal to the float64 reference, sample by sample."""
    tiny = 1e-309 if dtype == torch.float64 else 1e-39
    for case in range(3):
        fs, ft = _inputs(40 + case, [(3, 3, 6, 6), (3, 5, 6, 6)], torch.float64)
        side = ft if case == 1 else fs
        for b in ((1,) if case == 2 else range(3)):
            side[b] = side[b] / side[b].abs().max() * tiny
        fs, ft = fs.to(dtype), ft.to(dtype)
        loss, grad = _grad(lambda a, b: DF.attention_map_loss(a, b, p=2.0), fs, ft)
        want, want_grad = _grad(lambda a, b: ref.attention_map_loss_reference(a, b, 2.0), fs.double(), ft.double())
        assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all()), case
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(loss.double(), want, rtol=tol, atol=tol * 1e-2)
        for b in range(3):
            big = float(want_grad[b].abs().max())
            torch.testing.assert_close(grad[b].double(), want_grad[b], rtol=tol * 10, atol=tol * big)


def test_opcheck():
    s, t = _inputs(5, [(7, 3), (7, 4)])
    ps, pt = torch.tensor([0.5 / 3]).double(), torch.tensor([0.5 / 4]).double()
    for normalize in (False, True):
        torch.library.opcheck(torch.ops.distillx.kernel_gram.default,
                              (s.requires_grad_(True), t, 2, ps, pt, normalize, 0, True))
    w = torch.cat([torch.full((4,), 0.25), torch.full((3,), -1 / 3)]).cuda()
    torch.library.opcheck(torch.ops.distillx.kernel_mmd.default,
                          (s[:4].detach().requires_grad_(True), s[4:].detach(), w, 2, ps, 0, True))
    (f,) = _inputs(6, [(2, 3, 5, 4)])
    torch.library.opcheck(torch.ops.distillx.attention_map.default, (f.requires_grad_(True), 2.0))


def test_mixed_devices_are_errors():
    s, t = _inputs(8, [(5, 3), (5, 3)])
    with pytest.raises(RuntimeError, match="cpu|device"):
        torch.ops.distillx.kernel_gram(s, t.cpu(), 0, torch.zeros(0), torch.zeros(0), False, 0, True)
    with pytest.raises(RuntimeError, match="cpu|device"):
        torch.ops.distillx.kernel_mmd(s, t.cpu(), torch.ones(10, device="cuda"), 0, torch.zeros(0), 0, True)


@pytest.mark.parametrize("B,A,L", [(1, 1, 1), (2, 3, 7), (2, 2, 600), (1, 2, 1100)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_relation_matches_reference(B, A, L, masked):
    q_s, k_s, q_t, k_t = _inputs(B * A * L, [(B, A, L, 8), (B, A, L, 8), (B, A, L, 16), (B, A, L, 16)])
    mask = None
    if masked:
        mask = torch.ones(B, L, dtype=torch.bool, device="cuda")
        mask[-1, L // 2:] = False
        if L > 1:
            mask[0, 0] = False
    qs, ks = q_s.detach().clone().requires_grad_(True), k_s.detach().clone().requires_grad_(True)
    out = DF.attention_relation_loss(qs, ks, q_t, k_t, mask)
    gq, gk = torch.autograd.grad(out, (qs, ks))
    qs64, ks64 = q_s.double().requires_grad_(True), k_s.double().requires_grad_(True)
    want = ref.attention_relation_loss_reference(qs64, ks64, q_t.double(), k_t.double(), mask)
    wq, wk = torch.autograd.grad(want, (qs64, ks64))
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gq.double(), wq, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(gk.double(), wk, rtol=1e-3, atol=1e-6)


def test_attention_relation_gradcheck_and_opcheck():
    q_s, k_s, q_t, k_t = _inputs(11, [(2, 2, 5, 3)] * 2 + [(2, 2, 5, 4)] * 2, torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool, device="cuda")
    assert torch.autograd.gradcheck(lambda a, b: DF.attention_relation_loss(a, b, q_t, k_t, mask),
                                    (q_s.requires_grad_(True), k_s.requires_grad_(True)))
    torch.library.opcheck(torch.ops.distillx.attention_relation.default, (q_s, k_s, q_t, k_t, mask))
    _, stats = torch.ops.distillx.attention_relation(q_s, k_s, q_t, k_t, mask)
    torch.library.opcheck(torch.ops.distillx.attention_relation_backward.default,
                          (torch.tensor(1.5, dtype=torch.float64, device="cuda"), q_s.detach(), k_s.detach(), q_t,
                           k_t, mask, stats))


def test_attention_relation_memory_is_bounded():
    q_s, k_s, q_t, k_t = _inputs(12, [(24, 1, 8192, 32)] * 2 + [(24, 1, 8192, 64)] * 2)
    q_s.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    DF.attention_relation_loss(q_s, k_s, q_t, k_t, None).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * 2**20 + 2 * q_s.numel() * 4, f"{extra / 2**20:.1f} MiB extra"
