"""Hypothesis strategies drawing the fuzz cases of ``fuzz_cases.py`` (plain dicts, one per op).

Sizes include 1 and odd values; dtypes are all four the kernels take; every input gets one of the
``LAYOUTS``; masks include all-False ones; the values come from a drawn ``seed``, so shrinking works
on the structure (shapes, options) and a falsifying example prints as a complete, replayable case.
Sizes stay small: the fuzz suite runs on every ``make test``.
"""
from __future__ import annotations

from hypothesis import strategies as st

from .fuzz_cases import DTYPES, LAYOUTS, MASKS

dtypes = st.sampled_from(sorted(DTYPES))
layouts = st.sampled_from(LAYOUTS)
seeds = st.integers(0, 2**31 - 1)
temperatures = st.sampled_from([0.5, 1.0, 2.0, 4.0]) | st.floats(0.25, 8.0)
reductions = st.sampled_from(["batchmean", "sum", "mean", "none"])


def size(high: int) -> st.SearchStrategy[int]:
    """1..high, 1 and ``high`` (odd or even) favoured by hypothesis' shrinking and boundary draws."""
    return st.integers(1, high)


@st.composite
def divergences(draw) -> tuple[str, float]:
    divergence = draw(st.sampled_from(["kl", "reverse_kl", "jsd"]))
    beta = draw(st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0.0, 1.0)) if divergence == "jsd" else 0.5
    return divergence, beta


@st.composite
def kd_loss_cases(draw) -> dict:
    divergence, beta = draw(divergences())
    rows = draw(st.lists(size(5), min_size=0, max_size=2))
    return dict(
        seed=draw(seeds), dtype=draw(dtypes), t_dtype=draw(dtypes), rows=rows,
        classes=draw(size(40) | st.sampled_from([127, 257])),
        s_layout=draw(layouts), t_layout=draw(layouts), scale=draw(st.sampled_from([0.5, 2.0, 8.0])),
        temperature=draw(temperatures), divergence=divergence, beta=beta, reduction=draw(reductions),
        mask=draw(st.sampled_from(MASKS)), flat_mask=len(rows) > 1 and draw(st.booleans()),
    )


@st.composite
def linear_kd_loss_cases(draw) -> dict:
    divergence, beta = draw(divergences())
    rows = draw(st.lists(size(5), min_size=1, max_size=2))
    dtype = draw(dtypes)
    return dict(
        seed=draw(seeds), dtype=dtype, t_dtype=draw(st.sampled_from([dtype, "float32", "float64", "bfloat16"])),
        rows=rows, classes=draw(size(40)), hs=draw(size(9)), ht=draw(size(9)),
        s_bias=draw(st.booleans()), t_bias=draw(st.booleans()),
        chunk_size=draw(st.none() | size(8)),
        hs_layout=draw(layouts), ws_layout=draw(layouts), ht_layout=draw(layouts), wt_layout=draw(layouts),
        temperature=draw(temperatures), divergence=divergence, beta=beta, reduction=draw(reductions),
        mask=draw(st.sampled_from(MASKS)),
    )


@st.composite
def kernels(draw) -> tuple[str, dict, float]:
    """(kernel, parameters, input scale). A fixed Chebyshev ``scale`` is stored relative to the
    input scale and kept >= 8 standard deviations, so |x| / scale < 1 as the kernel requires."""
    kernel = draw(st.sampled_from(["linear", "polynomial", "rbf", "chebyshev", "cosine"]))
    params: dict = {}
    if kernel == "polynomial":
        params = draw(st.fixed_dictionaries({}, optional={"degree": st.integers(1, 4),
                                                          "coef0": st.sampled_from([0.0, 0.5, 1.0, -0.3])}))
    elif kernel == "rbf":
        params = draw(st.fixed_dictionaries({}, optional={"sigma2": st.floats(0.3, 5.0)}))
    elif kernel == "chebyshev":
        params = draw(st.fixed_dictionaries({}, optional={"order": st.integers(1, 4),
                                                          "eps": st.sampled_from([1e-3, 0.01, 0.1]),
                                                          "scale": st.sampled_from([8.0, 12.0])}))
    return kernel, params, draw(st.sampled_from([0.5, 1.0, 2.0]))


@st.composite
def kernel_gram_loss_cases(draw) -> dict:
    kernel, params, scale = draw(kernels())
    n = draw(size(13))
    s_rest = draw(st.lists(size(7), min_size=1, max_size=2))
    t_rest = draw(st.lists(size(7), min_size=1, max_size=2))
    return dict(seed=draw(seeds), dtype=draw(dtypes), kernel=kernel, params=params, scale=scale,
                normalize_rows=draw(st.booleans()), s_shape=[n, *s_rest], t_shape=[n, *t_rest],
                s_layout=draw(layouts), t_layout=draw(layouts))


@st.composite
def mmd_loss_cases(draw) -> dict:
    kernel, params, scale = draw(kernels())
    return dict(seed=draw(seeds), dtype=draw(dtypes), kernel=kernel, params=params, scale=scale,
                n=draw(size(13)), m=draw(size(13)), width=draw(size(9)),
                s_layout=draw(layouts), t_layout=draw(layouts))


@st.composite
def attention_map_loss_cases(draw) -> dict:
    b = draw(size(3))
    return dict(seed=draw(seeds), dtype=draw(dtypes), p=draw(st.sampled_from([1.0, 1.5, 2.0, 3.0]) | st.floats(1.0, 4.0)),
                s_shape=[b, draw(size(5)), draw(size(9)), draw(size(9))],
                t_shape=[b, draw(size(5)), draw(size(9)), draw(size(9))],
                s_layout=draw(layouts), t_layout=draw(layouts))


@st.composite
def attention_relation_loss_cases(draw) -> dict:
    return dict(seed=draw(seeds), dtype=draw(dtypes), B=draw(size(3)), A=draw(size(3)), L=draw(size(9)),
                ds=draw(size(8)), dt=draw(size(8)), mask=draw(st.sampled_from(MASKS)),
                self_relation=draw(st.booleans()), q_layout=draw(layouts), k_layout=draw(layouts),
                t_layout=draw(layouts))


CASES = {
    "kd_loss": kd_loss_cases(),
    "linear_kd_loss": linear_kd_loss_cases(),
    "kernel_gram_loss": kernel_gram_loss_cases(),
    "mmd_loss": mmd_loss_cases(),
    "attention_map_loss": attention_map_loss_cases(),
    "attention_relation_loss": attention_relation_loss_cases(),
}
