"""Every host header under csrc/include/distillx compiles on its own.

The CUDA files include these headers, and the CUDA build only runs on a machine with a CUDA torch
(never in CI): a header that used a name it did not include itself (``at::toOpMathType`` without
``ATen/OpMathType.h``) built on the CPU, where another include came first, and broke the first
CUDA build. Each header is compiled here alone (``g++ -fsyntax-only``) against torch's headers.
"""
from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = ROOT / "csrc" / "include"
HEADERS = sorted(p.relative_to(INCLUDE).as_posix() for p in (INCLUDE / "distillx").glob("*.h"))
CXX = shutil.which("g++") or shutil.which("c++")


def _compile(header: str) -> tuple[str, int, str]:
    from torch.utils.cpp_extension import include_paths

    flags = [f"-I{p}" for p in [str(INCLUDE), *include_paths()]]
    out = subprocess.run([CXX, "-std=c++17", "-fsyntax-only", "-x", "c++", *flags, "-include", header, "/dev/null"],
                         capture_output=True, text=True, timeout=300, check=False)
    return header, out.returncode, out.stderr


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (the extension build needs one too)")
def test_every_host_header_compiles_alone():
    assert len(HEADERS) >= 5, HEADERS  # the glob found the headers, so this test checks something
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_compile, HEADERS))
    failed = {h: err[-3000:] for h, rc, err in results if rc != 0}
    assert not failed, "headers that do not compile on their own:\n" + "\n".join(f"{h}:\n{e}" for h, e in failed.items())
