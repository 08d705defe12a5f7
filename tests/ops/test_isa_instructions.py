"""Each CPU kernel library holds only the instructions of its ISA: read off the machine code (objdump).

The runtime choice (test_cpu_isa.py) loads the ``avx2`` library on an AVX2 CPU and ``default`` on an
older one; one AVX-512 instruction that leaked into either (an inline function compiled with the
wrong flags, a header with a target attribute) would be a SIGILL on those CPUs only, which no test
on this machine's loaded ISA would see. ``distillx._C`` is imported on every CPU before the choice,
so it holds no vector extension at all. The positive checks make sure each library was really built
for its ISA (the flags reached the compiler): AVX2 with FMA in ``avx2``, 512-bit registers in
``avx512``. This is the one check of the ``avx512`` library that needs no AVX-512 CPU.
"""
from __future__ import annotations

import importlib.util
import platform
import re
import shutil
import subprocess

import pytest

from distillx import _ext

from .conftest import requires_kernel

pytestmark = [
    requires_kernel,
    pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                       reason="the ISA libraries are x86-64's (other platforms build one portable library)"),
]

# A VEX or EVEX instruction: an AVX register, a mask register, or a v-mnemonic on an xmm operand.
ANY_AVX = re.compile(r"%[yz]mm\d|%k[0-7]\b|^\s*[0-9a-f]+:\s+v[a-z0-9]+\s.*%xmm", re.M)
# What only AVX-512 (F/VL/BW/DQ) encodes: 512-bit and upper-16 registers, masks, broadcasts, and
# the mnemonics that have no VEX form.
AVX512_ONLY = re.compile(
    r"%zmm\d|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[0-7]\b|\{1to\d+\}"
    r"|\b(vpternlog|vperm[it]2|vrndscale|vscalef|vrcp14|vrsqrt14|vgetexp|vgetmant|vfixupimm|vrange"
    r"|vfpclass|valign[dq]|v\w+(32|64)x\d|vpmovm2|vpmov[bwdq]2m|vpcompress|vpexpand|vcompress|vexpand"
    r"|vpmullq|vpabsq|vp(max|min)[su]q|vpsraq|vpsravq|vpro[lr])\w*\s", re.M)


def _disassembly(path: str) -> str:
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils, installed with the compiler that built the extension) not found"
    out = subprocess.run([objdump, "-d", "--no-show-raw-insn", path], capture_output=True, text=True, check=True)
    assert re.search(r":\s+ret", out.stdout), f"objdump printed no code for {path}"
    return out.stdout


def _library(isa: str) -> str:
    if isa not in _ext.built_isas():
        pytest.skip(f"the {isa} library was not built here (DISTILLX_CPU_ISAS: {_ext.build_info().get('cpu_isas')})")
    return _ext.isa_library(isa)


def _first(pattern: re.Pattern, text: str) -> str | None:
    m = pattern.search(text)
    if m is None:
        return None
    start = text.rfind("\n", 0, m.start()) + 1
    end = text.find("\n", m.end())
    return text[start:end if end >= 0 else None].strip()


def test_the_core_library_uses_no_vector_extension():
    path = importlib.util.find_spec("distillx._C").origin
    assert _first(ANY_AVX, _disassembly(path)) is None


def test_the_default_library_runs_on_any_x86_64_cpu():
    code = _disassembly(_library("default"))
    assert _first(ANY_AVX, code) is None


def test_the_avx2_library_is_avx2_and_fma_and_nothing_of_avx512():
    code = _disassembly(_library("avx2"))
    assert _first(AVX512_ONLY, code) is None
    assert re.search(r"%ymm\d", code), "no 256-bit register in the avx2 library: built without -mavx2?"
    assert re.search(r"\bvfn?madd\w+\s", code), "no FMA instruction in the avx2 library: built without -mfma?"


def test_the_avx512_library_uses_512_bit_registers():
    code = _disassembly(_library("avx512"))
    assert re.search(r"%zmm\d", code), "no 512-bit register in the avx512 library: built without -mavx512f?"


def test_the_patterns_catch_what_they_are_for():
    """The checks above pass on clean code; here each pattern meets a line it exists to catch."""
    lines = {
        "  4a:\tvfmadd231ps %zmm1,%zmm2,%zmm3": AVX512_ONLY,
        "  4a:\tvaddps %ymm17,%ymm1,%ymm2": AVX512_ONLY,
        "  4a:\tvpternlogd $0xff,%ymm1,%ymm2,%ymm3": AVX512_ONLY,
        "  4a:\tvmovups (%rax),%ymm1{%k1}": AVX512_ONLY,
        "  4a:\tvextractf32x4 $0x1,%ymm1,%xmm2": AVX512_ONLY,
        "  4a:\tvaddps %ymm1,%ymm2,%ymm3": ANY_AVX,
        "  4a:\tvxorps %xmm0,%xmm0,%xmm0": ANY_AVX,
    }
    for line, pattern in lines.items():
        assert _first(pattern, line) == line.strip()
    assert _first(AVX512_ONLY, "  4a:\tvfmadd231ps %ymm1,%ymm2,%ymm3") is None
    assert _first(ANY_AVX, "  4a:\taddps %xmm1,%xmm2") is None
