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
