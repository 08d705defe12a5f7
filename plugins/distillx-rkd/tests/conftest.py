"""Every test of the plugin builds its own plugin manager, without the caller's DISTILLX_DISABLE_PLUGINS."""
import pytest

from distillx.plugin import reset_plugins


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    monkeypatch.delenv("DISTILLX_DISABLE_PLUGINS", raising=False)
    reset_plugins()
    yield
    reset_plugins()
