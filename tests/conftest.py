"""Suite-wide setup. With DISTILLX_REQUIRE_COMPILED=1 (set by `make test` and CI) the run fails fast
when distillx._C did not load, so a broken build cannot pass by silently testing the references."""
import os

import pytest

from distillx.plugin import reset_plugins


def pytest_sessionstart(session):
    if os.environ.get("DISTILLX_REQUIRE_COMPILED") == "1":
        from distillx import _ext

        if not _ext.available():
            raise pytest.UsageError(f"DISTILLX_REQUIRE_COMPILED=1 but distillx._C failed to load: {_ext._ERROR}")


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    """Every test builds its own plugin manager, without the caller's DISTILLX_DISABLE_PLUGINS."""
    monkeypatch.delenv("DISTILLX_DISABLE_PLUGINS", raising=False)
    reset_plugins()
    yield
    reset_plugins()


# Hypothesis profiles of the property-based fuzz suite (tests/ops/test_fuzz.py). Registered here, before
# pytest's configure step, so `pytest --hypothesis-profile=long` can select the long one. Both draw
# fresh examples on every run (derandomize=False), print the @reproduce_failure blob of a failure, keep
# no example database in the checkout (failures go into tests/ops/test_fuzz_regressions.py instead),
# and have no deadline (timings on a shared machine vary).
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the fuzz suite skips itself
    pass
else:
    _FUZZ = dict(deadline=None, derandomize=False, print_blob=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("fuzz", max_examples=1000, **_FUZZ)
    settings.register_profile("long", max_examples=10000, **_FUZZ)
    settings.load_profile("fuzz")
