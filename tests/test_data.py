"""The bundled digits data: content, scaling, deterministic splits and loaders."""
import hashlib

import pytest
import torch

from distillx.data import digits_loaders, digits_split, load_digits, tensor_loader

# Per-class counts of scikit-learn's load_digits() (UCI optdigits test set).
SKLEARN_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_shapes_dtypes_and_range():
    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1
    # Pixels are k/16 exactly: the scaling is lossless.
    assert torch.equal(x * 16, (x * 16).round())


def test_content_matches_sklearn():
    x, y = load_digits()
    assert torch.bincount(y).tolist() == SKLEARN_CLASS_COUNTS
    # Pixel sum and the first image/labels as exported from sklearn.datasets.load_digits().
    assert int((x * 16).round().sum()) == 561718
    assert y[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    first = (x[0] * 16).round().to(torch.uint8).reshape(8, 8)
    assert first[0].tolist() == [0, 0, 5, 13, 9, 1, 0, 0]
    # Columns 0, 32 and 39 are blank in every image of this data set.
    assert torch.count_nonzero(x[:, [0, 32, 39]]) == 0


def test_load_returns_fresh_tensors_and_dtype():
    x1, _ = load_digits()
    x1.zero_()
    x2, _ = load_digits(torch.float64)
    assert x2.dtype == torch.float64 and x2.max() == 1
    with pytest.raises(ValueError, match="dtype"):
        load_digits(torch.int64)


def test_split_is_stratified_deterministic_and_disjoint():
    s = digits_split(test_fraction=0.25, seed=0)
    assert len(s.x_train) + len(s.x_test) == 1797
    assert len(s.x_test) == sum(round(c * 0.25) for c in SKLEARN_CLASS_COUNTS)
    expected = torch.tensor([round(c * 0.25) for c in SKLEARN_CLASS_COUNTS])
    assert torch.equal(torch.bincount(s.y_test, minlength=10), expected)
    again = digits_split(test_fraction=0.25, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(s, again))
    other = digits_split(test_fraction=0.25, seed=1)
    assert not torch.equal(s.x_test, other.x_test)
    # No image is in both parts (rows hashed; the data set has no exact duplicates across a split).
    train_rows = {hashlib.sha1(r.numpy().tobytes()).digest() for r in s.x_train}
    assert not any(hashlib.sha1(r.numpy().tobytes()).digest() in train_rows for r in s.x_test)


def test_split_ignores_global_rng():
    torch.manual_seed(123)
    a = digits_split(seed=5)
    torch.manual_seed(456)
    b = digits_split(seed=5)
    assert torch.equal(a.y_test, b.y_test) and torch.equal(a.x_train, b.x_train)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        digits_split(test_fraction=fraction)


def test_loaders_batches_and_reproducible_order():
    train, test = digits_loaders(batch_size=100, seed=3)
    batches = list(train)
    assert [len(b[1]) for b in batches][:-1] == [100] * (len(batches) - 1)
    assert sum(len(b[1]) for b in batches) == len(digits_split(seed=3).y_train)
    xb, yb = batches[0]
    assert xb.shape == (100, 64) and yb.dtype == torch.int64
    # Same arguments -> same batch sequence, epoch after epoch, whatever the global RNG does.
    a, _ = digits_loaders(batch_size=100, seed=3)
    b, _ = digits_loaders(batch_size=100, seed=3)
    epochs_a = [[yb for _, yb in a] for _ in range(2)]
    torch.manual_seed(999)
    epochs_b = [[yb for _, yb in b] for _ in range(2)]
    for ea, eb in zip(epochs_a, epochs_b):
        assert all(torch.equal(p, q) for p, q in zip(ea, eb))
    assert not torch.equal(epochs_a[0][0], epochs_a[1][0])  # reshuffled each epoch
    # The test loader is ordered and complete.
    assert torch.equal(torch.cat([b[1] for b in test]), digits_split(seed=3).y_test)


def test_tensor_loader_validates():
    x, y = torch.zeros(4, 2), torch.zeros(3)
    with pytest.raises(ValueError, match="same length"):
        tensor_loader(x, y, 2)
    with pytest.raises(ValueError, match="batch_size"):
        tensor_loader(x, torch.zeros(4), 0)
