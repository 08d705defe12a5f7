"""``distillx info``: torch version, what the compiled core was built with, and which backend serves each op."""
from __future__ import annotations

import argparse
import json
import platform

import torch

from .. import _ext
from .._version import __version__
from ..ops import backend, library_ops


def collect() -> dict:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "distillx": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "compiled_core": _ext.available(),
        "build": _ext.build_info(),
        "cuda_kernels_built": bool(_ext.build_info().get("cuda", False)),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_isa": _ext.cpu_isa(),
        "cpu_isas_built": _ext.built_isas(),
        "cpu_kernels_error": _ext.cpu_error(),
        "threads": torch.get_num_threads(),
        "ops": {op: {dev: backend(op, dev) for dev in devices} for op in library_ops()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="distillx info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"distillx {info['distillx']}  torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'})  "
          f"python {info['python']}  threads {info['threads']}")
    if info["compiled_core"]:
        b = info["build"]
        print(f"compiled core: built against torch {b.get('torch_version')}, "
              f"OpenMP {'yes' if b.get('openmp') else 'no'}, "
              f"CUDA kernels {'built (CUDA ' + str(b.get('cuda_version')) + ')' if info['cuda_kernels_built'] else 'not built'}")
        built = ", ".join(info["cpu_isas_built"]) or "none"
        loaded = info["cpu_isa"] or f"none: {info['cpu_kernels_error']}"
        print(f"CPU kernels: {loaded} (built: {built}; this CPU: {info['cpu_capability']})")
    else:
        print(f"compiled core: MISSING ({_ext._ERROR}); every op runs its pure-PyTorch reference")
    print("op backends:")
    for op, per_device in info["ops"].items():
        print(f"  {op:<20} " + "  ".join(f"{dev}={kind}" for dev, kind in per_device.items()))
    return 0
