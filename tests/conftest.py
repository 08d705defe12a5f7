"""Suite-wide setup. With DISTILLX_REQUIRE_COMPILED=1 (set by `make test` and CI) the run fails fast
when distillx._C did not load, so a broken build cannot pass by silently testing the references."""
import os
import sys
import textwrap
from pathlib import Path

import pytest

from distillx.testing import fresh_plugins  # noqa: F401  (autouse: a fresh plugin manager per test)


def pytest_sessionstart(session):
    if os.environ.get("DISTILLX_REQUIRE_COMPILED") == "1":
        from distillx import _ext

        if not _ext.available():
            raise pytest.UsageError(f"DISTILLX_REQUIRE_COMPILED=1 but distillx._C failed to load: {_ext._ERROR}")
        if _ext.cpu_isa() is None:
            raise pytest.UsageError(f"DISTILLX_REQUIRE_COMPILED=1 but no CPU kernels loaded: {_ext.cpu_error()}")


@pytest.fixture
def install_fake(tmp_path, monkeypatch):
    """Make a fake distribution visible to importlib.metadata, as `pip install` would.

    ``install_fake(dist, version, entry_points={ep_name: "module[:attr]"}, modules={name: source})``
    writes ``<dist>-<version>.dist-info`` (METADATA, entry_points.txt) and the modules into a
    directory put first on sys.path, and returns that directory. The modules are removed from
    sys.modules afterwards so tests never see each other's imports.
    """
    written: list[str] = []

    def install(dist: str, version: str = "1.0", entry_points=None, modules=None) -> Path:
        root = tmp_path / f"site-{dist}"
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = ["[distillx]"] + [f"{name} = {target}" for name, target in (entry_points or {}).items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for module, source in (modules or {}).items():
            (root / f"{module}.py").write_text(textwrap.dedent(source))
            written.append(module)
        monkeypatch.syspath_prepend(str(root))  # also invalidates import caches
        return root

    yield install
    for module in written:
        sys.modules.pop(module, None)


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
    # The ISAs other than the loaded one (tests/ops/test_cpu_isa.py runs the suite once per ISA).
    settings.register_profile("isa", max_examples=100, **_FUZZ)
    settings.load_profile("fuzz")
