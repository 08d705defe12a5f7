"""distillx.functional.attention_relation_loss (MiniLM) and split_relation_heads: agreement with a
hand-written per-row KL and with the float64 reference (q is k self-relations, ds != dt, key padding,
L = 1), invariances that pin down the semantics (per-side 1/sqrt(d) scaling, padded tokens ignored),
gradcheck, and argument validation."""
from __future__ import annotations

import pytest
import torch

import distillx.functional as DF
from distillx.ops import reference as ref

from distillx.ops import attention_relation as relation_ops

from .conftest import F64, close, requires_kernel
from .feature_helpers import dtype_id, num_threads, oracle_relation_loss


@pytest.fixture(autouse=True, params=["fused", "pair"])
def relation_path(request, monkeypatch):
    """Every test runs on both kernel paths: the fused op (the CPU's for sequences up to
    FUSED_MAX_L) and the flash-style forward/backward pair (longer sequences, and CUDA)."""
    if request.param == "pair":
        monkeypatch.setattr(relation_ops, "FUSED_MAX_L", 0)
    return request.param

DTYPES = (torch.float32, F64)
# (B, A, L, ds, dt)
SHAPES = [(1, 1, 1, 3, 5), (2, 3, 5, 4, 4), (3, 2, 7, 3, 8), (1, 4, 9, 6, 2), (2, 1, 4, 1, 3)]


def _masks(rng, B, L):
    """None, all-True, random padding (>= 1 real token per row), and one element padded except token 0."""
    out = [("none", None), ("all", torch.ones(B, L, dtype=torch.bool))]
    if L > 1:
        m = torch.stack([rng.mask(L) for _ in range(B)])
        out.append(("random", m))
        one = torch.ones(B, L, dtype=torch.bool)
        one[0, 1:] = False
        out.append(("one-token", one))
    return out


def _inputs(rng, B, A, L, ds, dt, dtype, scale=1.5):
    return (rng.randn(B, A, L, ds, dtype=dtype, scale=scale), rng.randn(B, A, L, ds, dtype=dtype, scale=scale),
            rng.randn(B, A, L, dt, dtype=dtype, scale=scale), rng.randn(B, A, L, dt, dtype=dtype, scale=scale))


def _run(q_s, k_s, q_t, k_t, mask, self_relation=False, upstream=1.0):
    """Loss and gradients (q_s, k_s) of distillx's loss on fresh leaves; with self_relation the same leaf
    is passed as q_s and k_s (and q_t as k_t), and its gradient is returned twice."""
    q = q_s.detach().clone().requires_grad_(True)
    k = q if self_relation else k_s.detach().clone().requires_grad_(True)
    out = DF.attention_relation_loss(q, k, q_t, q_t if self_relation else k_t, mask)
    leaves = (q,) if self_relation else (q, k)
    grads = torch.autograd.grad(out, leaves, torch.tensor(upstream, dtype=out.dtype))
    return out.detach(), (grads * 2 if self_relation else grads)


def _run_ref(q_s, k_s, q_t, k_t, mask, self_relation=False, upstream=1.0):
    """The float64 reference on the same values (same leaf sharing as _run)."""
    q = q_s.detach().to(F64).requires_grad_(True)
    k = q if self_relation else k_s.detach().to(F64).requires_grad_(True)
    qt = q_t.detach().to(F64)
    kt = qt if self_relation else k_t.detach().to(F64)
    out = ref.attention_relation_loss_reference(q, k, qt, kt, mask)
    leaves = (q,) if self_relation else (q, k)
    grads = torch.autograd.grad(out, leaves, torch.tensor(upstream, dtype=F64))
    return out.detach(), (grads * 2 if self_relation else grads)


# ----------------------------------------------------------------------------------------------
# Agreement
# ----------------------------------------------------------------------------------------------
def test_matches_hand_written_kl(rng):
    """Tiny cases against an explicit per-row softmax / KL over the valid keys, averaged over the valid
    (b, head, query) rows; q is k self-relations too."""
    for B, A, L, ds, dt in SHAPES:
        q_s, k_s, q_t, k_t = _inputs(rng, B, A, L, ds, dt, F64)
        for mask_id, mask in _masks(rng, B, L):
            tag = rng.tag(B=B, A=A, L=L, ds=ds, dt=dt, mask=mask_id)
            want = oracle_relation_loss(q_s, k_s, q_t, k_t, mask)
            close(DF.attention_relation_loss(q_s, k_s, q_t, k_t, mask), torch.tensor(want, dtype=F64), F64, tag)
            want = oracle_relation_loss(q_s, q_s, q_t, q_t, mask)
            close(DF.attention_relation_loss(q_s, q_s, q_t, q_t, mask), torch.tensor(want, dtype=F64), F64,
                  f"self-relation {tag}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference(rng, dtype):
    """Loss and gradients w.r.t. q_s and k_s (and the shared q = k leaf) agree with the float64 reference
    under a random upstream gradient; outputs in the input dtype."""
    for B, A, L, ds, dt in SHAPES:
        q_s, k_s, q_t, k_t = _inputs(rng, B, A, L, ds, dt, dtype)
        for mask_id, mask in _masks(rng, B, L):
            for self_relation in (False, True):
                up = float(rng.randn(1, dtype=F64)) + 2.0
                tag = rng.tag(dtype=dtype, B=B, A=A, L=L, ds=ds, dt=dt, mask=mask_id, self_relation=self_relation)
                loss, grads = _run(q_s, k_s, q_t, k_t, mask, self_relation, up)
                want, want_grads = _run_ref(q_s, k_s, q_t, k_t, mask, self_relation, up)
                assert loss.dtype == dtype and loss.shape == (), tag
                close(loss, want, dtype, f"loss {tag}")
                for g, w in zip(grads, want_grads):
                    assert g.dtype == dtype and bool(torch.isfinite(g).all()), tag
                    close(g, w, dtype, f"grad {tag}", magnitude=up)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_half_inputs(rng, dtype):
    q_s, k_s, q_t, k_t = _inputs(rng, 2, 2, 6, 4, 8, dtype, scale=1.0)
    mask = torch.stack([rng.mask(6) for _ in range(2)])
    loss, grads = _run(q_s, k_s, q_t, k_t, mask)
    want, want_grads = _run_ref(q_s, k_s, q_t, k_t, mask)
    tag = rng.tag(dtype=dtype)
    assert loss.dtype == dtype and all(g.dtype == dtype for g in grads), tag
    close(loss, want, dtype, tag)
    for g, w in zip(grads, want_grads):
        close(g, w, dtype, tag)


# ----------------------------------------------------------------------------------------------
# Semantics: scaling, padding, degenerate sizes
# ----------------------------------------------------------------------------------------------
def test_zero_iff_relations_agree_with_per_side_scaling(rng):
    """Each side's logits are scaled by its own 1/sqrt(d): a student of width ds = 4·dt made of the
    teacher's vectors repeated 4 times, with q halved (q_s·k_s = 2 q_t·k_t, sqrt(ds) = 2 sqrt(dt)) has
    exactly the teacher's relations -> loss 0 and gradient 0. Without halving it does not."""
    for mask_id, mask in (("none", None), ("random", torch.stack([rng.mask(5) for _ in range(2)]))):
        q_t, k_t = rng.randn(2, 3, 5, 3, dtype=F64), rng.randn(2, 3, 5, 3, dtype=F64)
        q_s, k_s = 0.5 * q_t.repeat(1, 1, 1, 4), k_t.repeat(1, 1, 1, 4)
        tag = rng.tag(mask=mask_id)
        loss, (gq, gk) = _run(q_s, k_s, q_t, k_t, mask)
        assert abs(float(loss)) < 1e-13 and gq.abs().max() < 1e-12 and gk.abs().max() < 1e-12, tag
        loss2, _ = _run(2 * q_s, k_s, q_t, k_t, mask)
        assert float(loss2) > 1e-4, tag


def test_padding_is_ignored(rng):
    """Padded tokens neither contribute as keys nor as query rows: changing their q/k values (even to
    huge ones) leaves the loss unchanged, their gradients are exactly 0, and the loss equals the loss of
    the batch elements cropped to their real tokens, weighted by their numbers of real tokens."""
    B, A, L, ds, dt = 3, 2, 6, 4, 5
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    q_s, k_s, q_t, k_t = _inputs(rng, B, A, L, ds, dt, F64)
    loss, (gq, gk) = _run(q_s, k_s, q_t, k_t, mask)
    pad = ~mask[:, None, :, None]
    junk = [x.masked_fill(pad, 1e4) * rng.randn(*x.shape, dtype=F64) for x in (q_s, k_s, q_t, k_t)]
    loss2, _ = _run(*[torch.where(pad, j, x) for j, x in zip(junk, (q_s, k_s, q_t, k_t))], mask)
    tag = rng.tag(case="padding")
    close(loss2, loss, F64, tag)
    padded = pad.expand_as(gq)
    assert (gq[padded] == 0).all() and (gk[padded] == 0).all(), tag
    assert gq[~padded].abs().sum() > 0 and gk[~padded].abs().sum() > 0, tag
    total, rows = 0.0, 0
    for b in range(B):
        idx = mask[b].nonzero().squeeze(1)
        n = len(idx)
        crop = [x[b:b + 1, :, idx] for x in (q_s, k_s, q_t, k_t)]
        total += float(DF.attention_relation_loss(*crop)) * A * n
        rows += A * n
    close(loss, torch.tensor(total / rows, dtype=F64), F64, f"cropped {tag}")
    # The element with one real token contributes KL 0 (one key: both distributions are one-hot) but
    # counts as A valid rows: removing it changes the average by exactly that weight.
    keep = [0, 1]
    loss_without, _ = _run(*[x[keep] for x in (q_s, k_s, q_t, k_t)], mask[keep])
    close(loss, loss_without * (rows - A) / rows, F64, f"one-token element {tag}")


def test_single_token(rng):
    """L = 1 (or one real token): a single key gets probability 1 on both sides -> loss 0, gradient 0."""
    q_s, k_s, q_t, k_t = _inputs(rng, 2, 3, 1, 4, 6, F64)
    loss, grads = _run(q_s, k_s, q_t, k_t, None)
    assert float(loss) == 0 and all((g == 0).all() for g in grads)
    q_s, k_s, q_t, k_t = _inputs(rng, 2, 3, 5, 4, 6, F64)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3] = mask[1, 0] = True
    loss, grads = _run(q_s, k_s, q_t, k_t, mask)
    assert abs(float(loss)) < 1e-15 and all(bool(torch.isfinite(g).all()) and g.abs().max() < 1e-15 for g in grads)


def test_fully_padded_element(rng):
    """A batch element with no real token contributes nothing (no rows, no NaN); the loss equals that of
    the other elements."""
    q_s, k_s, q_t, k_t = _inputs(rng, 2, 2, 4, 3, 5, F64)
    mask = torch.tensor([[True, True, False, True], [False] * 4])
    loss, grads = _run(q_s, k_s, q_t, k_t, mask)
    want, _ = _run(*[x[:1] for x in (q_s, k_s, q_t, k_t)], mask[:1])
    tag = rng.tag(case="fully padded element")
    assert torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads), tag
    close(loss, want, F64, tag)
    assert all((g[1] == 0).all() for g in grads), tag


def test_teacher_is_constant(rng):
    q_s, k_s, q_t, k_t = [x.requires_grad_(True) for x in _inputs(rng, 2, 2, 4, 3, 5, torch.float32)]
    DF.attention_relation_loss(q_s, k_s, q_t, k_t).backward()
    assert q_t.grad is None and k_t.grad is None
    assert q_s.grad.abs().sum() > 0 and k_s.grad.abs().sum() > 0


def test_gradcheck(rng):
    """float64 gradcheck w.r.t. q_s and k_s (with and without padding, ds != dt), and w.r.t. the shared
    leaf of a self-relation."""
    for B, A, L, ds, dt in ((2, 2, 4, 3, 5), (1, 1, 3, 2, 2)):
        q_s, k_s, q_t, k_t = _inputs(rng, B, A, L, ds, dt, F64, scale=1.0)
        q_s.requires_grad_(True)
        k_s.requires_grad_(True)
        for mask_id, mask in _masks(rng, B, L):
            tag = rng.tag(B=B, A=A, L=L, ds=ds, dt=dt, mask=mask_id)
            assert torch.autograd.gradcheck(lambda q, k: DF.attention_relation_loss(q, k, q_t, k_t, mask),
                                            (q_s, k_s)), tag
            assert torch.autograd.gradcheck(lambda v: DF.attention_relation_loss(v, v, q_t, q_t, mask),
                                            (q_s,)), f"self-relation {tag}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_long_sequences_and_threads(rng, dtype):
    """L = 600 (several query blocks of 128 and key blocks of 256 in the fused op, with ragged last
    blocks), padding in the middle of one element, on 1 and 2 threads: loss and gradients equal the
    float64 reference."""
    B, A, L = 2, 2, 600
    q_s, k_s, q_t, k_t = _inputs(rng, B, A, L, 3, 5, dtype, scale=1.0)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 300:457] = False
    want, want_grads = _run_ref(q_s, k_s, q_t, k_t, mask)
    for threads in (1, 2):
        tag = rng.tag(dtype=dtype, L=L, threads=threads)
        with num_threads(threads):
            loss, grads = _run(q_s, k_s, q_t, k_t, mask)
        close(loss, want, dtype, f"loss {tag}")
        for g, w in zip(grads, want_grads):
            close(g, w, dtype, f"grad {tag}")


# ----------------------------------------------------------------------------------------------
# The raw operator distillx::attention_relation (once the compiled core has it)
# ----------------------------------------------------------------------------------------------
@requires_kernel
def test_opcheck_attention_relation(rng):
    cases = ((torch.float32, False, True), (F64, True, True), (F64, True, False), (torch.float32, True, True))
    for dtype, with_mask, requires_grad in cases:
        q_s, k_s, q_t, k_t = _inputs(rng, 2, 2, 5, 3, 4, dtype)
        mask = torch.stack([rng.mask(5) for _ in range(2)]) if with_mask else None
        q_s.requires_grad_(requires_grad)
        k_s.requires_grad_(requires_grad)
        torch.library.opcheck(torch.ops.distillx.attention_relation.default, (q_s, k_s, q_t, k_t, mask))
        _, stats = torch.ops.distillx.attention_relation(q_s, k_s, q_t, k_t, mask)
        torch.library.opcheck(torch.ops.distillx.attention_relation_backward.default,
                              (torch.tensor(1.3, dtype=dtype), q_s.detach(), k_s.detach(), q_t, k_t, mask, stats))


@requires_kernel
def test_raw_op_outputs(rng):
    """The forward returns the loss and each row's log-sum-exp of both sides' scaled scores over the real
    keys (0 on padded rows); the backward op, given those, returns upstream * (∂loss/∂q_s, ∂loss/∂k_s)."""
    B, A, L, ds, dt = 2, 3, 6, 4, 2
    q_s, k_s, q_t, k_t = _inputs(rng, B, A, L, ds, dt, F64)
    mask = torch.stack([rng.mask(L) for _ in range(B)])
    loss, stats = torch.ops.distillx.attention_relation(q_s, k_s, q_t, k_t, mask)
    want, (wq, wk) = _run_ref(q_s, k_s, q_t, k_t, mask)
    tag = rng.tag(case="raw attention_relation")
    close(loss, want, F64, tag)
    assert stats.shape == (B, A, L, 2), tag
    keys = mask[:, None, None, :]
    for side, (q, k, d) in enumerate(((q_s, k_s, ds), (q_t, k_t, dt))):
        z = (q @ k.transpose(-1, -2) / d ** 0.5).masked_fill(~keys, float("-inf"))
        lse = torch.where(mask[:, None, :], torch.logsumexp(z, -1).nan_to_num(0.0, 0.0, 0.0), 0.0)
        close(stats[..., side], lse, F64, f"{tag} lse side {side}")
    gq, gk = torch.ops.distillx.attention_relation_backward(torch.tensor(2.5, dtype=F64), q_s, k_s, q_t, k_t,
                                                            mask, stats)
    close(gq, 2.5 * wq, F64, tag)
    close(gk, 2.5 * wk, F64, tag)
    assert not gq[~mask[:, None, :].expand(B, A, L)].any(), "padded query rows get no gradient"


@requires_kernel
def test_compile_fullgraph(rng):
    """attention_relation_loss (a q-k relation with padding plus a self-relation) under
    torch.compile(fullgraph=True): loss and gradients equal eager and the float64 reference."""
    def fn(q_s, k_s, q_t, k_t, mask):
        return DF.attention_relation_loss(q_s, k_s, q_t, k_t, mask) + DF.attention_relation_loss(k_s, k_s, k_t, k_t)

    compiled = torch.compile(fn, fullgraph=True)
    for attempt in range(2):
        q_s, k_s, q_t, k_t = _inputs(rng, 2, 2, 6, 4, 8, torch.float32)
        mask = torch.stack([rng.mask(6) for _ in range(2)])
        tag = rng.tag(case="compiled attention_relation_loss", attempt=attempt)
        results = []
        for f in (compiled, fn):
            q, k = q_s.clone().requires_grad_(True), k_s.clone().requires_grad_(True)
            out = f(q, k, q_t, k_t, mask)
            results.append((out.detach(), torch.autograd.grad(out, (q, k))))
        (got, got_grads), (want, want_grads) = results
        close(got, want, torch.float32, tag)
        q, k = q_s.double().requires_grad_(True), k_s.double().requires_grad_(True)
        ref_out = (ref.attention_relation_loss_reference(q, k, q_t.double(), k_t.double(), mask)
                   + ref.attention_relation_loss_reference(k, k, k_t.double(), k_t.double()))
        ref_grads = torch.autograd.grad(ref_out, (q, k))
        close(got, ref_out, torch.float32, tag)
        for g, w, r in zip(got_grads, want_grads, ref_grads):
            close(g, w, torch.float32, tag)
            close(g, r, torch.float32, tag)
            assert g.abs().sum() > 0, tag


# ----------------------------------------------------------------------------------------------
# split_relation_heads
# ----------------------------------------------------------------------------------------------
def test_split_relation_heads(rng):
    """(B, L, H) -> (B, A, L, H/A), head a holding columns [a·H/A, (a+1)·H/A) of every token; it composes
    with the loss for models of different widths (MiniLMv2) and gradients flow back to x."""
    x = rng.randn(2, 5, 12)
    for A in (1, 2, 3, 4, 6, 12):
        y = DF.split_relation_heads(x, A)
        d = 12 // A
        assert y.shape == (2, A, 5, d), (A, y.shape)
        for a in range(A):
            assert torch.equal(y[:, a], x[:, :, a * d:(a + 1) * d]), (A, a)
    hs = rng.randn(2, 5, 12, dtype=F64).requires_grad_(True)
    ht = rng.randn(2, 5, 20, dtype=F64)
    loss = DF.attention_relation_loss(DF.split_relation_heads(hs, 4), DF.split_relation_heads(hs, 4),
                                      DF.split_relation_heads(ht, 4), DF.split_relation_heads(ht, 4))
    heads_s, heads_t = hs.detach().view(2, 5, 4, 3).transpose(1, 2), ht.view(2, 5, 4, 5).transpose(1, 2)
    want = oracle_relation_loss(heads_s, heads_s, heads_t, heads_t)
    close(loss, torch.tensor(want, dtype=F64), F64, rng.tag(case="split heads + loss"))
    loss.backward()
    assert hs.grad is not None and hs.grad.abs().sum() > 0


def test_split_relation_heads_errors(rng):
    x = rng.randn(2, 5, 12)
    with pytest.raises(ValueError, match=r"hidden width 12 is not divisible by num_heads=5"):
        DF.split_relation_heads(x, 5)
    for bad in (0, -2, 2.0, True, None, "4"):
        with pytest.raises(ValueError, match=r"^num_heads must be a positive int"):
            DF.split_relation_heads(x, bad)
    with pytest.raises(TypeError, match=r"^x must be a floating-point tensor"):
        DF.split_relation_heads(x.long(), 2)
    with pytest.raises(ValueError, match=r"^x must have at least 3 dimension"):
        DF.split_relation_heads(x[0], 2)
    # A 4-D input (already split, or (B, L, heads, d)) must be rejected with an error naming x.
    with pytest.raises(ValueError, match=r"\bx\b.*\(B, L, H\)|\bx must\b"):
        DF.split_relation_heads(x.view(2, 5, 3, 4), 2)


# ----------------------------------------------------------------------------------------------
# Argument validation of the loss
# ----------------------------------------------------------------------------------------------
def test_errors_name_the_argument(rng):
    q_s, k_s, q_t, k_t = _inputs(rng, 2, 3, 4, 5, 6, torch.float32)
    f = DF.attention_relation_loss
    with pytest.raises(ValueError, match=r"^k_s shape \(2, 3, 4, 4\) must match q_s shape \(2, 3, 4, 5\)"):
        f(q_s, k_s[..., :4], q_t, k_t)
    with pytest.raises(ValueError, match=r"^k_s shape"):
        f(q_s, k_s[:, :, :3], q_t, k_t)
    with pytest.raises(ValueError, match=r"^k_t shape"):
        f(q_s, k_s, q_t, k_t[..., :5])
    with pytest.raises(ValueError, match=r"^q_t \(B, A, L\) = \(2, 3, 3\) must match q_s's \(2, 3, 4\)"):
        f(q_s, k_s, q_t[:, :, :3], k_t[:, :, :3])
    with pytest.raises(ValueError, match=r"^q_t \(B, A, L\)"):
        f(q_s, k_s, q_t[:1], k_t[:1])
    with pytest.raises(ValueError, match=r"^q_t \(B, A, L\)"):
        f(q_s, k_s, q_t[:, :2], k_t[:, :2])
    with pytest.raises(ValueError, match=r"^q_s must have at least 4 dimension"):
        f(q_s[0], k_s, q_t, k_t)
    with pytest.raises(ValueError, match=r"^k_t must be \(B, A, L, d\)"):
        f(q_s, k_s, q_t, k_t[None])
    with pytest.raises(TypeError, match=r"^k_s must be a floating-point tensor"):
        f(q_s, k_s.int(), q_t, k_t)
    with pytest.raises(TypeError, match=r"^q_t must be a torch.Tensor"):
        f(q_s, k_s, q_t.tolist(), k_t)
    with pytest.raises(TypeError, match=r"^key_padding_mask must be a bool tensor"):
        f(q_s, k_s, q_t, k_t, torch.ones(2, 4))
    with pytest.raises(TypeError, match=r"^key_padding_mask must be a bool tensor"):
        f(q_s, k_s, q_t, k_t, [[True] * 4] * 2)
    for shape in ((2, 3), (4, 2), (2, 4, 1), (8,)):
        with pytest.raises(ValueError, match=r"^key_padding_mask must have shape \(2, 4\)"):
            f(q_s, k_s, q_t, k_t, torch.ones(*shape, dtype=torch.bool))
