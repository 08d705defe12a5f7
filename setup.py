"""Build distillx._C with torch.utils.cpp_extension.

Switches (environment):
  DISTILLX_FORCE_CPU=1      build the CPU kernels only, even when CUDA is present
  DISTILLX_FORCE_CUDA=1     build the CUDA kernels even when no GPU/CUDA torch is visible
  DISTILLX_CPU_CAPABILITY   vector ISA for the CPU kernels: avx2 (default on x86-64 that has it),
                            avx512, or default (portable scalar build)
  MAX_JOBS                  parallel compile jobs (honoured by ninja through cpp_extension)
"""
import glob
import os
import platform

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cpu_flags():
    """Pick the at::vec ISA. The kernels are built for the machine they install on."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "default", []
    cpuinfo = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        pass
    wanted = os.environ.get("DISTILLX_CPU_CAPABILITY", "").lower()
    if not wanted:
        wanted = "avx2" if (" avx2" in cpuinfo and " fma" in cpuinfo) else "default"
    if wanted == "avx2":
        return "avx2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    if wanted == "avx512":
        return "avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                          "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
    if wanted == "default":
        return "default", []
    raise ValueError(f"DISTILLX_CPU_CAPABILITY must be avx2, avx512 or default, got {wanted!r}")


def _want_cuda():
    if _flag("DISTILLX_FORCE_CPU"):
        return False
    if _flag("DISTILLX_FORCE_CUDA"):
        return True
    return CUDA_HOME is not None and torch.version.cuda is not None


def extensions():
    capability, isa_flags = _cpu_flags()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    with_cuda = _want_cuda()
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    define_macros = [("DISTILLX_CPU_CAPABILITY", f'"{capability}"')]
    cxx = ["-O3", "-fopenmp", "-ffp-contract=fast"] + isa_flags
    extra = {"cxx": cxx}
    ext_cls = CppExtension
    if with_cuda and cuda_sources:
        sources += cuda_sources
        define_macros.append(("DISTILLX_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        ext_cls = CUDAExtension
    return [
        ext_cls(
            "distillx._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc", "include")],
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
