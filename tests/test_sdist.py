"""The source distribution ships every input of the extension build (and the package data).

``pip install distillx-<version>.tar.gz`` compiles ``distillx._C`` from the archive alone; a header
left out (``csrc/include/**`` once was) only shows there, as ``fatal error: ...: No such file``.
This builds the sdist through the PEP 517 hook pip uses (in a copy of the tree, so no egg-info
lands in the checkout) and compares the archive against what the build reads, derived from the
repository itself: every C++/CUDA file under ``csrc/``, the extension's sources and every file
under its ``include_dirs`` (as ``setup.py`` computes them), the ``package-data`` globs and the
README named in ``pyproject.toml``. Nothing is compiled.
"""
from __future__ import annotations

import runpy
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
BUILD_SUFFIXES = {".cpp", ".cc", ".cu", ".h", ".hpp", ".cuh"}
# What a copy of the tree for building leaves out: VCS data, environments, build outputs, caches.
NOT_SOURCES = (".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis")
SKIP = shutil.ignore_patterns(*NOT_SOURCES, "*.egg-info", "*.so", "*.pyc")

pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").is_file(), reason="needs the source tree (setup.py)")


def _relative(paths) -> set[str]:
    return {Path(p).resolve().relative_to(ROOT).as_posix() for p in paths if Path(p).is_file()}


def extension_inputs(monkeypatch) -> set[str]:
    """Sources, and files under the repository's include_dirs, of every extension ``setup.py``
    declares (``setup()`` itself is replaced: nothing is built)."""
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(ROOT)  # setup.py globs sources relative to the working directory
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    extensions = captured.get("ext_modules") or []
    assert extensions, "setup.py declared no extension: this test would check nothing"
    files = set()
    for ext in extensions:
        files |= _relative(ROOT / s for s in ext.sources)
        for include in map(Path, ext.include_dirs):
            include = include if include.is_absolute() else ROOT / include
            include = include.resolve()
            # Not torch's own headers (the torch wheel has them), even when its environment sits in the checkout.
            if include.is_relative_to(ROOT) and not set(include.relative_to(ROOT).parts) & set(NOT_SOURCES) \
                    and "site-packages" not in include.parts:
                files |= _relative(include.rglob("*"))
    return files


def declared_data() -> set[str]:
    """The README and the ``[tool.setuptools.package-data]`` files named in pyproject.toml."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    files = {pyproject["project"]["readme"]}
    for package, patterns in pyproject.get("tool", {}).get("setuptools", {}).get("package-data", {}).items():
        base = ROOT / package.replace(".", "/")
        for pattern in patterns:
            files |= _relative(base.glob(pattern))
    return files


def build_inputs(monkeypatch) -> set[str]:
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*")
               if p.is_file() and p.suffix in BUILD_SUFFIXES}
    assert sources, "no C++ sources under csrc/"
    return sources | extension_inputs(monkeypatch) | declared_data() | {"setup.py", "pyproject.toml"}


@pytest.fixture(scope="module")
def sdist_members(tmp_path_factory) -> set[str]:
    """Paths inside the sdist built by setuptools' PEP 517 ``build_sdist`` (what pip and ``build`` call)."""
    tree, out = tmp_path_factory.mktemp("tree") / "src", tmp_path_factory.mktemp("sdist")
    shutil.copytree(ROOT, tree, ignore=SKIP)
    hook = f"import setuptools.build_meta as b; print(b.build_sdist({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", hook], cwd=tree, capture_output=True, text=True)
    assert done.returncode == 0, f"build_sdist failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    archive = out / done.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    return {name.split("/", 1)[1] for name in names if "/" in name}


def test_sdist_ships_every_build_input(sdist_members, monkeypatch):
    missing = sorted(build_inputs(monkeypatch) - sdist_members)
    assert not missing, f"the sdist lacks {len(missing)} build input(s) (add them to MANIFEST.in): {missing}"


def test_sdist_ships_no_build_outputs(sdist_members):
    outputs = sorted(n for n in sdist_members if n.endswith((".so", ".o", ".pyc", ".pyd")))
    assert not outputs, f"the sdist contains build outputs: {outputs}"
