"""Measure one case x implementation: warm-up, timed repeats, peak memory, loss/gradient summary.

:func:`run_spec` does it in the calling process; :func:`run_isolated` in a fresh Python subprocess
(``python -c "...runner._main" SPEC.json OUT.json``), so that compiled code, allocator state and
the CPU memory settings of one measurement never touch another. A spec is a plain JSON-able dict::

    {"case": "logit_kd", "impl": "eager" | "compile" | "distillx", "sizes": {...}, "dtype": "float32",
     "device": "cpu", "params": {...}, "fused_params": {...}, "repeats": 5, "warmup": 1,
     "max_time_s": 30.0, "seed": 0, "threads": None, "isolated": True}

or ``{"calibrate": True, "device": "cpu"}`` to check the CPU memory method (see ``memory.calibrate_cpu``),
or ``{"ceilings": True, "dtypes": ["float32", ...], "device": "cpu", "threads": 2, "mm_size": 4096,
"copy_mb": 256}`` to measure the machine's GEMM rate and copy bandwidth (see :mod:`.ceilings`).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, Optional

import torch

from .. import _ext, ops
from .._version import __version__
from . import ceilings, memory, timing
from .cases import get_case, load_callable

IMPLS = ("eager", "compile", "distillx")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Project root (the directory holding the distillx package), put on the child's PYTHONPATH so that it
# imports this very distillx.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_impl(case, impl: str):
    """The callable benchmarked as ``impl`` for ``case``."""
    if impl == "eager":
        return load_callable(case.reference)
    if impl == "compile":
        return torch.compile(load_callable(case.reference), **dict(case.compile_options))
    if impl == "distillx":
        return load_callable(case.fused)
    raise ValueError(f"unknown implementation {impl!r}; known: {', '.join(IMPLS)}")


def _probe_vectors(n: int, m: int, seed: int = 1234):
    g = torch.Generator().manual_seed(seed + 7919 * n + m)
    return torch.randn(n, generator=g, dtype=torch.float64), torch.randn(m, generator=g, dtype=torch.float64)


def grad_summary(grad: torch.Tensor, rows_per_chunk: int = 1024) -> Dict[str, float]:
    """Norm and a random bilinear probe ``aᵀ G b`` of a gradient, in float64, computed in row chunks.

    Two processes that computed the same gradient agree on both (the probe has the scale of the norm);
    a wrong scale, sign, transposition or a wrong subset of rows/columns changes them.
    """
    G = grad.detach().reshape(grad.shape[0], -1) if grad.dim() >= 1 else grad.detach().reshape(1, 1)
    a, b = _probe_vectors(G.shape[0], G.shape[1])
    b_dev = b.to(device=G.device)
    sq, probe = 0.0, 0.0
    for i in range(0, G.shape[0], rows_per_chunk):
        blk = G[i:i + rows_per_chunk].double()
        sq += float((blk * blk).sum())
        probe += float((blk @ b_dev).cpu() @ a[i:i + rows_per_chunk])
    return {"norm": sq ** 0.5, "probe": probe}


def _nonfinite_to_none(x: float) -> Optional[float]:
    return x if x == x and abs(x) != float("inf") else None


def run_spec(spec: Dict) -> Dict:
    """Measure one case x impl in this process (see the module docstring). Never raises: errors are
    returned as ``{"error": ...}``."""
    try:
        if spec.get("calibrate"):
            memory.return_freed_memory_to_os()
            return {"calibration": memory.calibrate_cpu()}
        if spec.get("ceilings"):
            return {"ceilings": _ceilings(spec)}
        return _run(spec)
    except Exception as exc:  # a failing implementation must not sink the whole benchmark
        tb = traceback.format_exc(limit=6)
        text = str(exc).lower()
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text:
            return {"error": f"out of memory: {str(exc).splitlines()[0] if str(exc) else exc!r}", "traceback": tb}
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": tb}


def _ceilings(spec: Dict) -> Dict:
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    unknown = [d for d in spec["dtypes"] if d not in DTYPES]
    if unknown:
        raise ValueError(f"ceilings spec: unknown dtypes {unknown}; known: {', '.join(DTYPES)}")
    return ceilings.measure({d: DTYPES[d] for d in spec["dtypes"]}, torch.device(spec.get("device", "cpu")),
                            int(spec["mm_size"]), int(spec["copy_mb"]), int(spec.get("repeats", ceilings.REPEATS)))


def _run(spec: Dict) -> Dict:
    case = get_case(spec["case"])
    impl = spec["impl"]
    device = torch.device(spec.get("device", "cpu"))
    dtype = DTYPES[spec.get("dtype", "float32")]
    sizes = dict(spec["sizes"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)

    gen = torch.Generator(device=device).manual_seed(int(spec.get("seed", 0)))
    inputs = case.build(sizes, dtype, device, gen)
    kwargs = dict(inputs.kwargs)
    kwargs.update(spec.get("params", {}))
    if impl == "distillx":
        # None means "the function's own default": not passed at all.
        kwargs.update({k: v for k, v in spec.get("fused_params", {}).items() if v is not None})
    fn = make_impl(case, impl)
    args = tuple(inputs.args.values())
    leaves = [t for _, t in inputs.grad_leaves()]

    def call():
        return fn(*args, **kwargs)

    warmup = int(spec.get("warmup", 1))
    if impl == "compile":
        warmup = max(warmup, 1)  # the first call compiles; it must never be timed
    t = timing.time_forward_backward(call, leaves, device, int(spec.get("repeats", 5)), warmup,
                                     spec.get("max_time_s"))

    # One more forward+backward, measured for memory; its loss and gradients are the ones checked.
    result_box = {}

    def measured():
        result_box["loss"] = timing.forward_backward(call)

    timing.clear_grads(leaves)
    mem_switch = None
    if device.type == "cpu" and spec.get("isolated", True):
        mem_switch = memory.return_freed_memory_to_os()
    mem = memory.measure(measured, device)
    if device.type == "cpu":
        if not spec.get("isolated", True):
            mem["note"] = "in-process: glibc keeps its default caching, so this may over-report"
        elif mem_switch is False:
            mem["note"] = "could not switch the allocator (not glibc?): may over-report by its cache"

    loss = float(result_box["loss"].float().cpu())
    grads = {}
    for name, leaf in inputs.grad_leaves():
        grads[name] = None if leaf.grad is None else grad_summary(leaf.grad)
    timing.clear_grads(leaves)

    first = t["warmup_s"][0] if t["warmup_s"] else None
    out = {
        "times_ms": t["times_ms"],
        "median_ms": t.get("median_ms"),
        "min_ms": t.get("min_ms"),
        "mean_ms": t.get("mean_ms"),
        "warmup_s": t["warmup_s"],
        "first_call_s": first,
        # Compilation time: first call minus a steady-state call.
        "compile_s": (max(first - t["median_ms"] / 1e3, 0.0) if impl == "compile" and first is not None
                      and t.get("median_ms") is not None else None),
        "peak_mb": mem["peak_mb"],
        "memory_method": mem["method"],
        "memory_note": mem["note"],
        "inputs_mb": inputs.nbytes() / memory.MB,
        "loss": _nonfinite_to_none(loss),
        "loss_finite": loss == loss and abs(loss) != float("inf"),
        "grads": grads,
        "threads": torch.get_num_threads(),
    }
    if impl == "distillx":
        out["distillx_backend"] = op_backend(case.op, device)
    return out


def op_backend(op: Optional[str], device: torch.device) -> str:
    """"compiled" or "reference": what serves ``distillx::op`` on ``device``."""
    if op is None:
        return "compiled" if _ext.available() else "reference"
    return ops.backend(op, device.type)


def run_isolated(spec: Dict, timeout: Optional[float] = None) -> Dict:
    """Run :func:`run_spec` in a fresh Python process that imports this very distillx."""
    spec = dict(spec, isolated=True)
    with tempfile.TemporaryDirectory(prefix="distillx-bench-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        # Not ``-m``: that would put the working directory first on sys.path, and a different distillx
        # there (a source checkout) would shadow the one running this benchmark.
        bootstrap = (f"import sys; sys.path.insert(0, {_ROOT!r}); "
                     "from distillx.benchmarks.runner import _main; sys.exit(_main(sys.argv[1:]))")
        cmd = [sys.executable, "-c", bootstrap, spec_path, out_path]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return {"error": f"timed out after {timeout:.0f} s", "stderr_tail": _tail(exc.stderr)}
        wall = time.perf_counter() - t0
        if os.path.exists(out_path):
            with open(out_path) as f:
                out = json.load(f)
            out["process_wall_s"] = wall
            if out.get("error"):
                out["stderr_tail"] = _tail(proc.stderr)
            return out
        return {"error": f"benchmark process exited with code {proc.returncode}", "stderr_tail": _tail(proc.stderr),
                "process_wall_s": wall}


def _tail(text, n: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> Dict:
    """What the numbers were measured on."""
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_capability": _safe(lambda: torch.backends.cpu.get_cpu_capability()),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": _safe(lambda: len(os.sched_getaffinity(0))),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "loadavg_at_start": _safe(lambda: list(os.getloadavg())),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gb=props.total_memory / 1e9)
    env["distillx"] = __version__
    env["distillx_build_info"] = _jsonable(_ext.build_info())
    env["distillx_cpu_isa"] = _ext.cpu_isa()
    env["distillx_compiled"] = _ext.available()
    if not _ext.available():
        env["distillx_missing_reason"] = getattr(_ext, "_ERROR", None)
    env["git_commit"] = _git_commit()
    return env


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _safe(fn):
    try:
        return fn()
    except Exception:
        return None


def _jsonable(obj):
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if isinstance(obj, dict):
            return {str(k): _jsonable(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [_jsonable(v) for v in obj]
        return str(obj)


def _main(argv) -> int:
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    out = run_spec(spec)
    with open(out_path, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
