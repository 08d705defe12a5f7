"""Build distillx._C and the CPU kernel libraries with torch.utils.cpp_extension.

Layout: ``distillx._C`` holds every operator schema, the CUDA kernels and the build information; the
CPU kernels (csrc/cpu/*.cpp) are compiled once per vector ISA into ``distillx/_cpu_<isa>*.so``, and
``distillx._ext`` loads the best one the running CPU supports (as ATen does with CPU_CAPABILITY), so
one build runs on any x86-64 CPU and uses AVX-512 where there is one. Only one ISA library is ever
loaded into a process, so code the compiler vectorised for AVX-512 can never run on an AVX2 CPU.

Switches (environment):
  DISTILLX_FORCE_CPU=1      build the CPU kernels only, even when CUDA is present
  DISTILLX_FORCE_CUDA=1     build the CUDA kernels even when no GPU/CUDA torch is visible
  DISTILLX_CPU_ISAS         comma-separated ISAs to build the CPU kernels for: default (portable),
                            avx2, avx512. Default on x86-64: all three; elsewhere: default.
  MAX_JOBS                  parallel compile jobs (honoured by ninja through cpp_extension)
"""
import copy
import glob
import os
import platform

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# at::vec picks its implementation from CPU_CAPABILITY_<ISA>; the flags are the ones ATen builds its
# own kernels with (AVX512 needs F/BW/VL/DQ, which is what torch's capability check asks the CPU for).
ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
}
X86_ISAS = ("default", "avx2", "avx512")


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cpu_isas():
    """The ISAs to compile the CPU kernels for (DISTILLX_CPU_ISAS, or every one the platform has)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    wanted = os.environ.get("DISTILLX_CPU_ISAS", "").strip().lower()
    if not wanted:
        return list(X86_ISAS) if x86 else ["default"]
    isas = [isa.strip() for isa in wanted.split(",") if isa.strip()]
    allowed = X86_ISAS if x86 else ("default",)
    bad = [isa for isa in isas if isa not in allowed]
    if bad or not isas:
        raise ValueError(f"DISTILLX_CPU_ISAS must list some of {', '.join(allowed)} (comma-separated) on "
                         f"{platform.machine()}, got {wanted!r}")
    return sorted(set(isas), key=X86_ISAS.index)


def _want_cuda():
    if _flag("DISTILLX_FORCE_CPU"):
        return False
    if _flag("DISTILLX_FORCE_CUDA"):
        return True
    return CUDA_HOME is not None and torch.version.cuda is not None


class _Build(BuildExtension):
    """One build folder per extension: the ISA libraries compile the same sources with other flags,
    and a shared folder would make ninja rebuild every object on every build. The folder is set on a
    copy of the command, so `build_ext -j N` (extensions built in parallel threads) stays correct."""

    def finalize_options(self):
        super().finalize_options()
        # Build the extensions side by side unless told otherwise (-j N): the ISA libraries are
        # independent, and one ninja per extension leaves cores idle behind its slowest file.
        if self.parallel is None:
            self.parallel = True

    def build_extension(self, ext):
        own = copy.copy(self)
        own.build_temp = os.path.join(self.build_temp, ext.name.rsplit(".", 1)[-1])
        BuildExtension.build_extension(own, ext)


def extensions():
    include = [os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    isas = _cpu_isas()
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = _want_cuda() and bool(cuda_sources)
    define_macros = [("DISTILLX_CPU_ISAS", '"' + ",".join(isas) + '"')]
    extra = {"cxx": list(cxx)}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    ext_cls = CppExtension
    if with_cuda:
        sources += cuda_sources
        define_macros.append(("DISTILLX_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        ext_cls = CUDAExtension
    core = ext_cls("distillx._C", sources, include_dirs=include, define_macros=define_macros,
                   extra_compile_args=extra, extra_link_args=["-fopenmp"])
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # Loaded with torch.ops.load_library (a plain shared library registering the CPU kernels), not
    # imported: the module name only places the file next to distillx/_C.
    kernels = [CppExtension(f"distillx._cpu_{isa}", cpu_sources, include_dirs=include,
                            extra_compile_args={"cxx": cxx + ISA_FLAGS[isa]}, extra_link_args=["-fopenmp"])
               for isa in isas]
    return [core] + kernels


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": _Build.with_options(use_ninja=True)},
)
