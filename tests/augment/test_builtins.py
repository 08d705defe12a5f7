"""The six built-in augmentations: contract (shapes, determinism, RNG hygiene, no in-place) and values."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distillx.augment import CutMix, Flip, Mixup, Noise, RandomCrop, TokenMask


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n=8, c=3, h=8, w=8, seed=0):
    return torch.randn(n, c, h, w, generator=gen(1000 + seed)), torch.randint(0, 10, (n,), generator=gen(seed))


def tokens(n=8, length=32, seed=0):
    ids = torch.randint(5, 100, (n, length), generator=gen(2000 + seed))
    ids[:, -5:] = 0  # padding
    return ids, torch.randint(0, 3, (n,), generator=gen(seed))


# name -> (augmentation, batch); the expected targets shape/dtype follow from mixes_targets.
CASES = {
    "random_crop": (lambda: RandomCrop(padding=2), images),
    "random_crop_reflect": (lambda: RandomCrop(padding=3, mode="reflect"), images),
    "flip": (lambda: Flip(), images),
    "noise": (lambda: Noise(std=0.5), images),
    "mixup": (lambda: Mixup(alpha=0.4, num_classes=10), images),
    "cutmix": (lambda: CutMix(alpha=1.0, num_classes=10), lambda: images(n=8, h=16, w=16)),
    "token_mask": (lambda: TokenMask(p=0.3, mask_id=1, pad_id=0), tokens),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    make_aug, make_batch = CASES[request.param]
    return make_aug(), make_batch


def test_shape_dtype_and_targets(case):
    aug, make_batch = case
    x, y = make_batch()
    out, out_y = aug(x, y, gen())
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    if aug.mixes_targets:
        assert out_y.shape == (x.shape[0], 10) and out_y.dtype == torch.float32
        assert torch.allclose(out_y.sum(1), torch.ones(x.shape[0]))
    else:
        assert out_y is y
    assert aug.changes_inputs


def test_same_seed_same_output_different_seed_different(case):
    aug, make_batch = case
    x, y = make_batch()
    a = aug(x, y, gen(7))
    b = aug(x, y, gen(7))
    c = aug(x, y, gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_generator_state_advances_and_resumes(case):
    # Two batches in a row vs. restarting from the saved state after the first: bitwise equal.
    aug, make_batch = case
    x, y = make_batch()
    g = gen(3)
    aug(x, y, g)
    saved = g.get_state()
    second = aug(x, y, g)
    resumed = torch.Generator()
    resumed.set_state(saved)
    again = aug(x, y, resumed)
    assert torch.equal(second[0], again[0]) and torch.equal(second[1], again[1])


def test_global_rng_is_neither_used_nor_advanced(case):
    aug, make_batch = case
    x, y = make_batch()
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = aug(x, y, gen(4))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    second = aug(x, y, gen(4))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_inputs_and_targets_are_not_modified(case):
    aug, make_batch = case
    x, y = make_batch()
    x0, y0 = x.clone(), y.clone()
    out, _ = aug(x, y, gen())
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert out.data_ptr() != x.data_ptr()


def test_generator_is_required(case):
    aug, make_batch = case
    x, y = make_batch()
    with pytest.raises(TypeError, match=rf"augmentation {aug.name!r}: generator must be a torch.Generator"):
        aug(x, y, None)


# -- random_crop ---------------------------------------------------------------------------
def _find_offset(sample: torch.Tensor, padded: torch.Tensor, h: int, w: int):
    hits = [(i, j) for i in range(padded.shape[-2] - h + 1) for j in range(padded.shape[-1] - w + 1)
            if torch.equal(padded[:, i:i + h, j:j + w], sample)]
    return hits[0] if hits else None


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_random_crop_is_a_window_of_the_padded_input(mode):
    x = torch.randn(32, 2, 6, 7, generator=gen(5))
    p = 3
    out, _ = RandomCrop(padding=p, mode=mode)(x, None, gen(6))
    padded = F.pad(x, (p, p, p, p), mode=mode)
    offsets = [_find_offset(out[n], padded[n], 6, 7) for n in range(32)]
    assert None not in offsets
    assert len(set(offsets)) > 5  # independent offsets per sample
    assert all(0 <= i <= 2 * p and 0 <= j <= 2 * p for i, j in offsets)


def test_random_crop_reflect_with_padding_beyond_the_image_matches_numpy():
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3) * 1.5 + 0.25
    p = 5
    out, _ = RandomCrop(padding=p, mode="reflect")(x, None, gen(0))
    padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (p, p), (p, p)), mode="reflect"))
    for n in range(2):
        assert _find_offset(out[n], padded[n], 3, 3) is not None


def test_random_crop_integer_images_and_zero_padding():
    x = torch.randint(0, 256, (4, 3, 5, 5), generator=gen(1), dtype=torch.uint8)
    out, _ = RandomCrop(padding=2)(x, None, gen(2))
    padded = F.pad(x, (2, 2, 2, 2))
    assert out.dtype == torch.uint8
    assert all(_find_offset(out[n], padded[n], 5, 5) is not None for n in range(4))
    same, _ = RandomCrop(padding=0)(x, None, gen(2))
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()


# -- flip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [-1, (-2, -1), (1,)])
def test_flip_with_p1_is_torch_flip_and_p0_identity(dims):
    x, _ = images()
    expected = torch.flip(x, (dims,) if isinstance(dims, int) else dims)
    assert torch.equal(Flip(p=1.0, dims=dims)(x, None, gen())[0], expected)
    assert torch.equal(Flip(p=0.0, dims=dims)(x, None, gen())[0], x)


def test_flip_decides_per_sample():
    x, _ = images(n=64)
    out, _ = Flip(p=0.5)(x, None, gen(9))
    flipped = [torch.equal(out[n], x[n].flip(-1)) for n in range(64)]
    kept = [torch.equal(out[n], x[n]) for n in range(64)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48


# -- noise ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_noise_statistics_and_dtype(dtype):
    x = torch.zeros(64, 1000, dtype=dtype)
    out, _ = Noise(std=0.3)(x, None, gen())
    assert out.dtype == dtype
    assert out.float().mean().item() == pytest.approx(0.0, abs=0.01)
    assert out.float().std().item() == pytest.approx(0.3, rel=0.02)
    assert torch.equal(Noise(std=0.0)(x, None, gen())[0], x)


# -- mixup ---------------------------------------------------------------------------------
def test_mixup_inputs_and_targets_follow_lambda_and_permutation():
    n = 16
    x = torch.randn(n, 3, 4, 4, generator=gen(1))
    y = torch.arange(n)  # distinct labels: the targets reveal lambda and the permutation
    for seed in range(5):
        out, t = Mixup(alpha=0.4, num_classes=n)(x, y, gen(seed))
        assert torch.allclose(t.sum(1), torch.ones(n))
        lam = t[torch.arange(n), y]
        partners = [i for i in range(n) if lam[i] < 1]
        assert partners, "every sample paired with itself"
        lam_value = lam[partners[0]].item()
        assert torch.allclose(lam[partners], torch.full((len(partners),), lam_value))
        perm = torch.arange(n)
        for i in partners:
            row = t[i].clone()
            row[i] = 0
            perm[i] = int(row.argmax())
            assert row[perm[i]].item() == pytest.approx(1 - lam_value, abs=1e-6)
        assert sorted(perm.tolist()) == list(range(n))
        expected = lam_value * x + (1 - lam_value) * x[perm]
        assert torch.allclose(out, expected, atol=1e-5)


def test_mixup_soft_targets_are_mixed_directly():
    x, y = images(n=8)
    aug = Mixup(alpha=0.4, num_classes=10)
    x1, soft = aug(x, y, gen(1))
    x2, twice = aug(x1, soft, gen(2))  # already (N, C) probabilities
    assert twice.shape == (8, 10) and torch.allclose(twice.sum(1), torch.ones(8))
    twice64 = Mixup(alpha=0.4)(x1, soft.double(), gen(2))[1]  # num_classes not needed for soft targets
    assert twice64.dtype == torch.float64 and torch.allclose(twice64.float(), twice)


def test_mixed_targets_work_with_cross_entropy():
    x, y = images(n=8)
    _, t = Mixup(num_classes=10)(x, y, gen())
    logits = torch.randn(8, 10, generator=gen(3))
    expected = -(t * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(F.cross_entropy(logits, t), expected)


# -- cutmix --------------------------------------------------------------------------------
def test_cutmix_target_weights_are_the_pasted_area_fraction():
    n, h, w = 8, 12, 10
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 2, h, w).contiguous()
    y = torch.arange(n)
    pasted_any = False
    for seed in range(10):
        out, t = CutMix(alpha=1.0, num_classes=n)(x, y, gen(seed))
        assert torch.allclose(t.sum(1), torch.ones(n))
        masks = out != x  # where each image took its partner's pixels
        for i in range(n):
            frac = masks[i].float().mean().item()
            if frac == 0:
                continue
            pasted_any = True
            partner = int(out[i][masks[i]][0])
            assert torch.all(out[i][masks[i]] == partner)
            assert t[i, partner].item() == pytest.approx(frac, abs=1e-6)
            assert t[i, i].item() == pytest.approx(1 - frac, abs=1e-6)
        # the same rectangular box for the whole batch
        box = masks.any(0).any(0)
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        if rows.numel():
            assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert pasted_any


def test_cutmix_integer_images():
    x = torch.randint(0, 256, (4, 3, 8, 8), generator=gen(1), dtype=torch.uint8)
    out, t = CutMix(num_classes=3)(x, torch.tensor([0, 1, 2, 0]), gen(2))
    assert out.dtype == torch.uint8 and t.dtype == torch.float32


# -- token_mask ----------------------------------------------------------------------------
def test_token_mask_rate_and_pads():
    ids = torch.randint(5, 1000, (256, 512), generator=gen(1))
    ids[:, 400:] = 0
    out, _ = TokenMask(p=0.15, mask_id=3, pad_id=0)(ids, None, gen(2))
    assert torch.equal(out[:, 400:], ids[:, 400:])  # pads never masked
    changed = out != ids
    assert torch.all(out[changed] == 3)
    assert changed[:, :400].float().mean().item() == pytest.approx(0.15, abs=0.005)


def test_token_mask_without_pad_id_masks_everything_at_p1():
    ids, _ = tokens()
    out, _ = TokenMask(p=1.0, mask_id=7)(ids, None, gen())
    assert torch.all(out == 7)
    assert torch.equal(TokenMask(p=0.0, mask_id=7)(ids, None, gen())[0], ids)


# -- bad batches ---------------------------------------------------------------------------
@pytest.mark.parametrize("aug, inputs, targets, message", [
    (RandomCrop(), torch.zeros(3, 8, 8), None, r"'random_crop': inputs must be a tensor of shape \(N, C, H, W\)"),
    (RandomCrop(), [1, 2], None, r"'random_crop': inputs must be a tensor .* got a list"),
    (Flip(), torch.zeros(4), None, r"'flip': inputs must be a tensor of shape \(N, \.\.\.\) with at least 2"),
    (Flip(dims=(0,)), torch.zeros(4, 3), None, r"'flip': option dims=\(0,\) does not name .*dimension 0 is the batch"),
    (Flip(dims=(2,)), torch.zeros(4, 3), None, r"'flip': option dims=\(2,\)"),
    (Flip(dims=(1, -1)), torch.zeros(4, 3), None, r"'flip': option dims=\(1, -1\)"),
    (Noise(), torch.zeros(4, 3, dtype=torch.long), None, r"'noise': inputs must be .*floating-point.*torch.int64"),
    (Mixup(num_classes=3), torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long),
     r"'mixup': inputs must be a tensor of shape \(N, \.\.\.\) floating-point"),
    (Mixup(), torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), r"'mixup': .*need the option num_classes"),
    (Mixup(num_classes=3), torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]),
     r"'mixup': targets must be class indices in \[0, num_classes=3\), got values in \[0, 3\]"),
    (Mixup(num_classes=3), torch.zeros(4, 3), torch.zeros(5, dtype=torch.long),
     r"'mixup': targets must be class indices, an integer \(N,\) tensor .*N = 4.*shape \(5,\)"),
    (Mixup(num_classes=3), torch.zeros(4, 3), None, r"'mixup': targets must be .* got NoneType"),
    (Mixup(num_classes=3), torch.zeros(4, 3), torch.zeros(4, 4), r"'mixup': soft targets have 4 classes but option "
                                                                  r"num_classes=3"),
    (CutMix(num_classes=3), torch.zeros(4, 3, 8), torch.zeros(4, dtype=torch.long),
     r"'cutmix': inputs must be a tensor of shape \(N, C, H, W\)"),
    (TokenMask(mask_id=1), torch.zeros(4, 8), None, r"'token_mask': inputs must be a tensor of shape \(N, L\) integer"),
    (TokenMask(mask_id=1), torch.zeros(4, 8, 2, dtype=torch.long), None, r"'token_mask': .*\(N, L\)"),
    (TokenMask(mask_id=300), torch.zeros(4, 8, dtype=torch.int8), None,
     r"'token_mask': option mask_id=300 does not fit"),
])
def test_bad_batches_name_the_augmentation_and_the_expected_shape(aug, inputs, targets, message):
    with pytest.raises(ValueError, match=message):
        aug(inputs, targets, gen())
