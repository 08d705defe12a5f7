"""Fixtures for the feature-method tests: a fresh plugin manager per test."""
from __future__ import annotations

import pytest

from distillx.plugin import reset_plugins


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    monkeypatch.delenv("DISTILLX_DISABLE_PLUGINS", raising=False)
    reset_plugins()
    yield
    reset_plugins()
