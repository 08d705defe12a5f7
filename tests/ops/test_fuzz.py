"""Property-based fuzzing of every distillx.functional op against its pure-PyTorch reference.

Hypothesis draws a case per example (``fuzz_strategies``: shapes with 1 and odd sizes, the four
dtypes, transposed/sliced/expanded inputs, masks with all-False rows, the op's parameters) and
``fuzz_cases.CHECKS`` compares the compiled op with the float64 reference on the same rounded values,
loss and gradients w.r.t. the student inputs. The examples differ on every run (``derandomize=False``);
a failure prints the falsifying case (a dict to paste into ``test_fuzz_regressions.py``) and the
``@reproduce_failure`` blob. Profiles (tests/conftest.py): the default ``fuzz`` keeps this file short
enough for every ``make test``; ``pytest --hypothesis-profile=long tests/ops/test_fuzz.py`` runs many
more examples.
"""
from __future__ import annotations

import pytest

pytest.importorskip("hypothesis", reason="the fuzz suite needs hypothesis (pip install -e '.[test]')")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from .conftest import requires_kernel  # noqa: E402
from .fuzz_cases import CHECKS  # noqa: E402
from .fuzz_strategies import CASES  # noqa: E402

pytestmark = requires_kernel  # the reference against itself would prove nothing


@pytest.mark.parametrize("op", sorted(CASES))
@given(data=st.data())
def test_matches_reference(op, data):
    """The compiled ``op`` equals the float64 reference (values and student gradients) on a drawn case."""
    CHECKS[op](data.draw(CASES[op], label=op))
