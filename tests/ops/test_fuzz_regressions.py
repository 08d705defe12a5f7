"""Every case the fuzz suite (test_fuzz.py) has found failing, replayed as a plain parametrised test.

A case is the dict hypothesis printed as the falsifying draw (``Draw 1 (<op>): {...}``); it holds the
seed of its values, so it reproduces exactly without hypothesis. Each entry says what it found.
"""
from __future__ import annotations

import pytest

from .conftest import requires_kernel
from .fuzz_cases import CHECKS

pytestmark = requires_kernel

REGRESSIONS = [
    pytest.param(
        "kernel_gram_loss",
        {"seed": 1, "dtype": "float16", "kernel": "chebyshev", "params": {}, "scale": 0.5, "normalize_rows": False,
         "s_shape": [2, 1], "t_shape": [2, 1], "s_layout": "contiguous", "t_layout": "contiguous"},
        id="gram-chebyshev-f16-gradient-beyond-f16-range",
        # Not a bug: width 1 puts the Chebyshev kernel at its singular diagonal (1 - x~^2 + eps = eps),
        # the exact gradient is 2.4e7 and float16 rounds it to inf. The check now expects an infinity
        # of the right sign where the float64 value lies beyond the dtype's range.
    ),
    pytest.param(
        "kernel_gram_loss",
        {"seed": 6692, "dtype": "bfloat16", "kernel": "cosine", "params": {}, "scale": 0.5, "normalize_rows": False,
         "s_shape": [2, 1], "t_shape": [2, 1], "s_layout": "contiguous", "t_layout": "contiguous"},
        id="gram-cosine-bf16-computed-in-bf16",
        # Wrapper bug, fixed: cosine rows were normalised (and the dense forms run) in bfloat16 instead
        # of float32; the exact gradient is 0 (width 1), the op returned -0.0625.
    ),
    pytest.param(
        "linear_kd_loss",
        {"seed": 0, "dtype": "float16", "t_dtype": "bfloat16", "rows": [1, 2], "classes": 2, "hs": 1, "ht": 1,
         "s_bias": False, "t_bias": True, "chunk_size": None, "hs_layout": "contiguous", "ws_layout": "contiguous",
         "ht_layout": "sliced", "wt_layout": "contiguous", "temperature": 0.5, "divergence": "kl", "beta": 0.5,
         "reduction": "batchmean", "mask": "none"},
        id="linear-bf16-teacher-f16-student",
        # Test model, not a bug: the kernel rounds the bfloat16 teacher logits once, PyTorch's
        # bfloat16 F.linear (width 1) rounds product and bias sum separately: one ulp apart, amplified
        # by 1/T. A teacher less precise than the student now gets grid values (exact logits).
    ),
    pytest.param(
        "linear_kd_loss",
        {"seed": 0, "dtype": "float64", "t_dtype": "float32", "rows": [1], "classes": 2, "hs": 1, "ht": 3,
         "s_bias": False, "t_bias": True, "chunk_size": None, "hs_layout": "contiguous", "ws_layout": "contiguous",
         "ht_layout": "contiguous", "wt_layout": "transposed", "temperature": 0.5, "divergence": "kl", "beta": 0.5,
         "reduction": "batchmean", "mask": "none"},
        id="linear-f32-teacher-f64-student",
        # The same for a float32 teacher of a float64 student: 4e-8 apart from summation order alone.
    ),
    pytest.param(
        "linear_kd_loss",
        {"seed": 2, "dtype": "bfloat16", "t_dtype": "bfloat16", "rows": [2, 4], "classes": 2, "hs": 5, "ht": 2,
         "s_bias": True, "t_bias": True, "chunk_size": None, "hs_layout": "contiguous", "ws_layout": "contiguous",
         "ht_layout": "transposed", "wt_layout": "expanded", "temperature": 0.5, "divergence": "kl", "beta": 0.5,
         "reduction": "sum", "mask": "none"},
        id="linear-bf16-teacher-bf16-student",
        # The same for a teacher as precise as its half-precision student, once the CPU kernel began to
        # multiply half inputs in float32 (rounding the teacher's logits once): every half-precision
        # teacher now gets grid values.
    ),
    pytest.param(
        "kernel_gram_loss",
        {"seed": 1009397, "dtype": "float64", "kernel": "rbf", "params": {}, "scale": 0.5, "normalize_rows": False,
         "s_shape": [3, 4], "t_shape": [3, 1], "s_layout": "expanded", "t_layout": "contiguous"},
        id="gram-rbf-identical-rows",
        # Reference bug, fixed: for identical rows (an expanded input) rbf_mean_sigma2 cancelled to 3e-16
        # instead of 0 (fallback 1), and the reference's gradient became noise (0.25 where it is 0).
    ),
    pytest.param(
        "kernel_gram_loss",
        {"seed": 0, "dtype": "float64", "kernel": "rbf", "params": {}, "scale": 0.5, "normalize_rows": False,
         "s_shape": [3, 1], "t_shape": [3, 1], "s_layout": "expanded", "t_layout": "contiguous"},
        id="gram-rbf-identical-rows-centred",
        # The same after a first fix that centred by the mean: the rounded mean of three equal values
        # differs from them by 1e-16, σ² came out 4e-32, the reference's gradient 4.5e15.
    ),
    pytest.param(
        "mmd_loss",
        {"seed": 512, "dtype": "float32", "kernel": "cosine", "params": {}, "scale": 0.5, "n": 1, "m": 11,
         "width": 1, "s_layout": "contiguous", "t_layout": "contiguous"},
        id="mmd-cosine-width-1-small-row",
        # Test model, not a bug: in one dimension the cosine gradient's two terms of size 1/|s| cancel
        # exactly; float64 gets 0, float32 3e-5 for |s| = 0.008. The check now bounds that rounding.
    ),
]


@pytest.mark.parametrize("op,case", REGRESSIONS)
def test_fuzz_regression(op, case):
    CHECKS[op](case)
