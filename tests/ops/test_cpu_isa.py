"""The CPU kernels are built once per vector ISA and the best one the CPU runs is loaded (distillx/_ext.py).

The rest of the suite tests the loaded ISA in process. Here: the choice itself, and every other ISA
this machine can run, through the fuzz suite and its regressions in a subprocess capped with
``DISTILLX_CPU_CAPABILITY`` (one ISA library per process: they cannot be swapped in place). An ISA
this CPU cannot execute (AVX-512 on an AVX2-only machine) is skipped with the reason; on a machine
that has it, it is the one loaded and the whole suite runs it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distillx import _ext

from .conftest import SEED_ENV, requires_kernel

ROOT = Path(__file__).resolve().parents[2]
CAPABILITY = torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("capability,cap,expected", [
    ("AVX512", None, ["avx512", "avx2", "default"]),
    ("AVX2", None, ["avx2", "default"]),
    ("DEFAULT", None, ["default"]),
    ("SVE256", None, ["default"]),  # another platform's name: only the portable build applies
    ("AVX512", "avx2", ["avx2", "default"]),
    ("AVX512", " AVX2 ", ["avx2", "default"]),
    ("AVX2", "avx512", ["avx2", "default"]),  # the cap never raises the ISA above what the CPU has
    ("AVX512", "default", ["default"]),
    ("AVX2", "", ["avx2", "default"]),
])
def test_isa_candidates(capability, cap, expected):
    assert _ext.isa_candidates(capability, cap) == expected


@pytest.mark.parametrize("cap", ["avx3", "sse4", "1", "true"])
def test_a_bad_cap_names_the_variable_and_the_choices(cap):
    with pytest.raises(ValueError, match=r"DISTILLX_CPU_CAPABILITY must be one of default, avx2, avx512, got"):
        _ext.isa_candidates("AVX2", cap)


@requires_kernel
def test_the_best_built_isa_this_cpu_runs_is_loaded():
    wanted = [isa for isa in _ext.isa_candidates(CAPABILITY, os.environ.get(_ext.CAPABILITY_ENV))
              if isa in _ext.built_isas()]
    assert wanted, f"no built ISA runs here: built {_ext.built_isas()}, CPU {CAPABILITY}"
    assert _ext.cpu_isa() == wanted[0]
    assert _ext.cpu_error() is None


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != _ext.CAPABILITY_ENV}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])), **extra)
    return env


def _info(**extra) -> dict:
    out = subprocess.run([sys.executable, "-m", "distillx.cli", "info", "--json"], env=_env(**extra),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_without_a_library_for_this_cpu_the_reason_names_the_capability_and_the_builds(monkeypatch):
    monkeypatch.setattr(_ext, "_CPU_ISA", None)
    monkeypatch.setattr(_ext, "_CPU_ERROR", None)
    monkeypatch.setattr(_ext, "isa_library", lambda isa: None)
    monkeypatch.setenv(_ext.CAPABILITY_ENV, "default")
    _ext._load_cpu()
    assert _ext.cpu_isa() is None
    assert _ext.cpu_error() == (f"no CPU kernel library for this CPU (capability {CAPABILITY}, "
                                "DISTILLX_CPU_CAPABILITY=default; built: none)")


@requires_kernel
def test_a_library_the_build_did_not_make_is_never_loaded(monkeypatch):
    """A stale ISA library (from an earlier build with another DISTILLX_CPU_ISAS) next to the current
    ones: the choice skips it, however good its ISA."""
    loaded = _ext.cpu_isa()
    others = [isa for isa in _ext.isa_candidates(CAPABILITY) if isa != loaded and _ext.isa_library(isa)]
    monkeypatch.setattr(_ext, "build_info", lambda: {"cpu_isas": ",".join(others)})
    assert loaded not in _ext.built_isas() and _ext.isa_library(loaded) is not None
    tried = []
    monkeypatch.setattr(_ext.torch.ops, "load_library", lambda path: tried.append(path))
    monkeypatch.setattr(_ext, "_CPU_ISA", None)
    monkeypatch.setattr(_ext, "_CPU_ERROR", None)
    monkeypatch.delenv(_ext.CAPABILITY_ENV, raising=False)
    _ext._load_cpu()
    assert _ext.isa_library(loaded) not in tried
    assert _ext.cpu_isa() == (others[0] if others else None)


def test_a_library_that_fails_to_load_is_named(monkeypatch, tmp_path):
    broken = tmp_path / "_cpu_avx2.so"
    broken.write_bytes(b"not an ELF file")
    monkeypatch.setattr(_ext, "_CPU_ISA", None)
    monkeypatch.setattr(_ext, "_CPU_ERROR", None)
    monkeypatch.setattr(_ext, "isa_library", lambda isa: str(broken))
    monkeypatch.setattr(_ext, "build_info", lambda: {"cpu_isas": "default,avx2,avx512"})
    monkeypatch.delenv(_ext.CAPABILITY_ENV, raising=False)
    _ext._load_cpu()
    assert _ext.cpu_isa() is None
    assert _ext.cpu_error().startswith("_cpu_avx2.so failed to load (")


@requires_kernel
def test_a_cap_below_every_build_leaves_the_cpu_ops_on_the_references():
    """The cap a user sets on the command line: the portable build where it is installed, else the
    references, with the reason in `distillx info`."""
    info = _info(**{_ext.CAPABILITY_ENV: "default"})
    if "default" in _ext.built_isas():
        assert info["cpu_isa"] == "default" and info["ops"]["logit_divergence"]["cpu"] == "compiled"
    else:
        assert info["cpu_isa"] is None and info["ops"]["logit_divergence"]["cpu"] == "reference"
        assert "no CPU kernel library for this CPU" in info["cpu_kernels_error"]


def test_a_bad_cap_stops_the_import_with_its_name():
    out = subprocess.run([sys.executable, "-c", "import distillx"], env=_env(**{_ext.CAPABILITY_ENV: "avx3"}),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "DISTILLX_CPU_CAPABILITY must be one of default, avx2, avx512, got 'avx3'" in out.stderr


@requires_kernel
@pytest.mark.parametrize("isa", _ext.ISAS)
def test_every_isa_this_cpu_runs_passes_the_fuzz_suite(isa):
    if isa == _ext.cpu_isa():
        pytest.skip(f"{isa} is the ISA loaded here: the whole suite runs it in process")
    if isa not in _ext.built_isas():
        pytest.skip(f"{isa} is not built here (built: {_ext.built_isas()})")
    if isa not in _ext.isa_candidates(CAPABILITY):
        pytest.skip(f"this CPU ({CAPABILITY}) cannot execute {isa}")
    cap = {_ext.CAPABILITY_ENV: isa}
    assert _ext.isa_candidates(CAPABILITY, isa)[0] == isa
    assert _info(**cap)["cpu_isa"] == isa
    seed = {SEED_ENV: os.environ[SEED_ENV]} if SEED_ENV in os.environ else {}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-profile=isa",
         "tests/ops/test_fuzz.py",
         "tests/ops/test_fuzz_regressions.py"],
        cwd=ROOT, env=_env(DISTILLX_REQUIRE_COMPILED="1", **cap, **seed), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"the fuzz suite failed on the {isa} kernels:\n{out.stdout[-6000:]}\n{out.stderr[-2000:]}"
    assert " passed" in out.stdout and " failed" not in out.stdout
