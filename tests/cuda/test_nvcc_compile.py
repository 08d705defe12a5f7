"""Compile every CUDA kernel header with nvcc for sm_80 and sm_90, without a GPU.

Catches CUDA compile errors in CI, which has nvcc but no GPU and a CPU build of torch. Skipped
where nvcc is not installed.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc")
KERNEL_HEADERS = sorted((ROOT / "csrc" / "include" / "distillx" / "cuda").glob("*.cuh"))


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile(arch, tmp_path):
    check = Path(__file__).with_name("kernels_check.cu")
    text = check.read_text()
    # Every kernel header must be instantiated by the check file, or its templates go unchecked.
    missing = [h.name for h in KERNEL_HEADERS if f"distillx/cuda/{h.name}" not in text
               and h.name != "reduce.cuh"]
    assert not missing, f"add instantiations of {missing} to {check.name}"
    cmd = [NVCC, "-std=c++17", "-O3", "--use_fast_math", f"-arch={arch}", "-I", str(ROOT / "csrc" / "include"),
           "-c", str(check), "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "k.o").stat().st_size > 0


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_attention_map_arithmetic_under_flush_to_zero(tmp_path):
    """attention_map_host_check.cu runs the CUDA attention-map kernels' arithmetic (column sums, the
    rescale to the sample's maximum, the gradient) on the CPU, float with flush-to-zero and
    denormals-are-zero on as --use_fast_math has it on the GPU (on x86; elsewhere unflushed): subnormal,
    normal, above-2^126, NaN and inf samples against a double computation."""
    check = Path(__file__).with_name("attention_map_host_check.cu")
    exe = tmp_path / "attention_map_host_check"
    cmd = [NVCC, "-std=c++17", "-O2", "--use_fast_math", "-arch=sm_80", "-I", str(ROOT / "csrc" / "include"),
           str(check), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-4000:]
