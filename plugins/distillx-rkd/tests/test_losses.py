"""The RKD losses against the paper's formulas (a naive loop oracle), their invariances and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rkd_paper_reference as paper
from distillx_rkd import rkd_angle_loss, rkd_distance_loss, rkd_loss
from distillx_rkd.losses import pairwise_distances

LOSSES = {"distance": (rkd_distance_loss, paper.distance_loss), "angle": (rkd_angle_loss, paper.angle_loss)}


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def orthogonal(d, seed):
    q, _ = torch.linalg.qr(randn(d, d, seed=seed))
    return q


# -- values -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("s_shape, t_shape, seed", [
    ((6, 5), (6, 11), 0),          # student narrower than teacher
    ((5, 13), (5, 3), 1),          # student wider
    ((4, 2, 3), (4, 7), 2),        # per-sample maps are flattened
    ((3, 4), (3, 4), 3),           # the smallest batch
])
def test_matches_paper_formulas(kind, s_shape, t_shape, seed):
    ours, oracle = LOSSES[kind]
    s, t = randn(*s_shape, seed=seed), randn(*t_shape, seed=seed + 100)
    expected = oracle(s, t)
    assert expected.item() > 1e-3  # unrelated embeddings: the comparison is not between two zeros
    torch.testing.assert_close(ours(s, t), expected, rtol=1e-10, atol=1e-12)


def test_huber_linear_branch_matches():
    # An outlier stretches the student's distances, so some |ψ_D(s) − ψ_D(t)| > 1 (Huber's linear part).
    s, t = randn(7, 4, seed=4), randn(7, 6, seed=5)
    s[0] += 40.0
    assert paper.max_distance_gap(s, t) > 1.0
    torch.testing.assert_close(rkd_distance_loss(s, t), paper.distance_loss(s, t), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rkd_angle_loss(s, t), paper.angle_loss(s, t), rtol=1e-10, atol=1e-12)


def test_duplicate_embeddings_follow_the_paper_definition():
    # μ averages over all N(N-1) off-diagonal pairs, zero-distance duplicates included (the authors' code
    # averages positive distances only); a zero difference vector makes a degenerate angle (cos 0).
    s, t = randn(6, 4, seed=31), randn(6, 5, seed=32)
    t[1] = t[0]
    t[4] = t[0]
    s[3] = s[2]
    for ours, oracle in LOSSES.values():
        torch.testing.assert_close(ours(s, t), oracle(s, t), rtol=1e-10, atol=1e-12)


def test_combined_loss_is_weighted_sum():
    s, t = randn(6, 5, seed=6), randn(6, 9, seed=7)
    expected = 25.0 * paper.distance_loss(s, t) + 50.0 * paper.angle_loss(s, t)
    torch.testing.assert_close(rkd_loss(s, t), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rkd_loss(s, t, distance_weight=2.0, angle_weight=0.0),
                               2.0 * paper.distance_loss(s, t), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rkd_loss(s, t, distance_weight=0.0, angle_weight=3.0),
                               3.0 * paper.angle_loss(s, t), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="both 0"):
        rkd_loss(s, t, 0.0, 0.0)


@pytest.mark.parametrize("kind", LOSSES)
def test_float32_close_to_float64_oracle_even_with_a_large_offset(kind):
    # Post-ReLU-like features share a big offset; the centred Gram form must not lose the distances.
    ours, oracle = LOSSES[kind]
    s, t = randn(8, 16, seed=8), randn(8, 32, seed=9)
    expected = oracle(s, t)
    out = ours((s + 300.0).float(), (t - 500.0).float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_float32_loss(dtype):
    s, t = randn(6, 8, seed=10), randn(6, 12, seed=11)
    out = rkd_loss(s.to(dtype), t.to(dtype))
    assert out.dtype == torch.float32
    expected = rkd_loss(s.to(dtype).double(), t.to(dtype).double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_float32_distances_of_duplicates_are_exact_zeros():
    x = randn(6, 64, seed=33) + 300.0
    x[4] = x[1]
    d = pairwise_distances(x.float())
    assert d[1, 4] == 0 and d[4, 1] == 0 and (d.diagonal() == 0).all()
    torch.testing.assert_close(d.double(), torch.cdist(x, x), rtol=1e-4, atol=1e-4)


# -- invariances ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LOSSES)
def test_invariant_to_similarity_transforms_of_either_side(kind):
    loss = LOSSES[kind][0]
    s, t = randn(7, 5, seed=12), randn(7, 9, seed=13)
    base = loss(s, t)
    assert base.item() > 1e-3
    for scale in (1e-9, 1e-3, 7.3, 1e9):  # the duplicate/rounding thresholds are relative
        torch.testing.assert_close(loss(s, scale * t), base)
        torch.testing.assert_close(loss(scale * s, t), base)
    torch.testing.assert_close(loss(s, t @ orthogonal(9, 14) + randn(9, seed=15)), base)   # rotate + shift teacher
    torch.testing.assert_close(loss(s @ orthogonal(5, 16) - 3.0, t), base)                 # and the student


@pytest.mark.parametrize("kind", LOSSES)
def test_zero_when_student_is_teacher_up_to_similarity(kind):
    # Embed the teacher (width 6) isometrically into width 10, rotate, scale, shift: same relations.
    loss = LOSSES[kind][0]
    t = randn(8, 6, seed=17)
    s = 0.37 * (t @ orthogonal(10, 18)[:6]) + randn(10, seed=19)
    assert loss(s, t).item() == pytest.approx(0.0, abs=1e-12)
    assert loss(t.clone(), t).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kind", LOSSES)
def test_not_invariant_to_anisotropic_scaling(kind):
    # The relations change when one axis is stretched: the losses do see geometry.
    loss = LOSSES[kind][0]
    t = randn(8, 4, seed=20)
    s = t * torch.tensor([1.0, 1.0, 1.0, 6.0], dtype=t.dtype)
    assert loss(s, t).item() > 1e-3


# -- gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LOSSES)
def test_gradcheck_wrt_student(kind):
    loss = LOSSES[kind][0]
    t = randn(5, 7, seed=21)
    s = randn(5, 3, seed=22).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: loss(x, t), (s,), eps=1e-6, atol=1e-7)


def test_gradcheck_combined_with_huber_linear_branch():
    t = randn(6, 4, seed=23)
    s = randn(6, 4, seed=24)
    s[0] += 30.0
    assert paper.max_distance_gap(s, t) > 1.0
    assert torch.autograd.gradcheck(lambda x: rkd_loss(x, t), (s.requires_grad_(),), eps=1e-6, atol=1e-6)


def test_gradient_matches_oracle_gradient():
    t = randn(5, 6, seed=25)
    s1 = randn(5, 4, seed=26).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    rkd_loss(s1, t).backward()
    (25.0 * paper.distance_loss(s2, t) + 50.0 * paper.angle_loss(s2, t)).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-8, atol=1e-10)


def test_teacher_gets_no_gradient():
    s = randn(6, 4, seed=27).requires_grad_()
    t = randn(6, 8, seed=28).requires_grad_()
    rkd_loss(s, t).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_duplicate_student_embeddings_keep_gradients_finite_and_small():
    # Two identical rows (a collapsed student): a zero difference vector must not blow up the gradient
    # (F.normalize's clamp would give it 1/eps = 1e12).
    t = randn(6, 5, seed=29)
    s = randn(6, 3, seed=30)
    s[1] = s[0]
    s.requires_grad_()
    rkd_loss(s, t).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 1e3
    e = F.normalize(s.detach()[None] - s.detach()[:, None], dim=2)
    assert e[0, 1].abs().sum() == 0  # the difference really is zero


# -- bad inputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [rkd_distance_loss, rkd_angle_loss])
def test_input_errors(fn):
    name = fn.__name__
    with pytest.raises(ValueError, match=f"{name}: .*at least 3 samples.*got 2"):
        fn(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match=f"{name}: .*at least 3 samples.*got 1"):
        fn(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="student batch 4 != teacher batch 5"):
        fn(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="student embeddings must be a batch"):
        fn(torch.randn(4), torch.randn(4, 3))
    with pytest.raises(TypeError, match="teacher embeddings must be a floating-point tensor, got a torch.int64"):
        fn(torch.randn(4, 3), torch.ones(4, 3, dtype=torch.long))
