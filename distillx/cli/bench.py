"""``distillx bench``: eager PyTorch, torch.compile and distillx side by side, in one run.

For every selected case (see :mod:`distillx.benchmarks.cases`) and implementation:

- ``eager``    the pure-PyTorch reference from :mod:`distillx.ops.reference`;
- ``compile``  ``torch.compile`` of that same reference (compiled during warm-up; the compile time is
               reported, never timed);
- ``distillx`` the fused op from :mod:`distillx.functional`,

it times forward+backward (median and min over ``--repeats`` after ``--warmup`` untimed calls; slow cases
stop after ``--max-time`` seconds of repeats, with at least 3), measures
the peak extra memory of one forward+backward (over the inputs; gradients and temporaries count), and
checks the loss and gradients against eager. Each case x implementation runs in a fresh subprocess
(``--no-isolate`` runs them in this process), so compiled code and allocator state never leak from one
measurement into the next. It prints a table, and with ``--json PATH`` writes the environment and every
measurement.

Ceilings and floors: the same run first measures the machine's ``torch.mm`` rate (GFLOP/s, float32 and
the run's dtype) and ``copy_`` bandwidth (GB/s), in a fresh subprocess at each thread count (see
:mod:`distillx.benchmarks.ceilings`); every case with a cost model (``Case.cost``: GEMM FLOPs and
minimum bytes of forward+backward) gets its floor, ``max(FLOPs / rate, bytes / bandwidth)``, and each
implementation the fraction of it achieved (floor / median). ``--threads 1,2`` runs every measurement
at each thread count and adds distillx's speed-up over the fewest threads.

Timing: CPU ``time.perf_counter``; CUDA events after ``torch.cuda.synchronize``. Memory: CPU peak
resident-set growth (glibc told to return freed memory to the OS, kernel peak-RSS counter reset through
``/proc/self/clear_refs``; see :mod:`distillx.benchmarks.memory`); CUDA ``max_memory_allocated`` minus
what was allocated before the call. MB = 10^6 bytes.

Exit status: 0 when every measurement ran and every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..benchmarks import ceilings
from ..benchmarks.cases import CASES, get_case, sizes_label
from ..benchmarks.report import fmt_mb, fmt_ms, format_table, notes, summarise
from ..benchmarks.runner import DTYPES, IMPLS, environment, run_isolated, run_spec

QUICK_REPEATS, QUICK_WARMUP = 3, 1


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def _size_keys() -> List[str]:
    keys: List[str] = []
    for case in CASES.values():
        keys += [k for k in case.size_keys() if k not in keys]
    return keys


def _csv(choices: Sequence[str], what: str):
    def parse(text: str) -> List[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or repr(text)}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(items))
    return parse


def _assignment(text: str):
    """``[CASE.]KEY=VALUE`` -> (case or None, key, raw value)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected [CASE.]KEY=VALUE, got {text!r}")
    case, dot, key = key.rpartition(".")
    return (case if dot else None), key, value


def _parse_value(raw: str):
    """A --param value: int, float, true/false/none, else the string."""
    low = raw.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _threads(text: str) -> List[int]:
    """``--threads N`` or ``N,M,...``: positive thread counts, in order, duplicates dropped."""
    items = [x.strip() for x in text.split(",")]
    bad = [x for x in items if not x.isdigit() or int(x) < 1]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas (e.g. 1,2), got {text!r}"
            + (f": {', '.join(repr(b) for b in bad)} is not a positive integer" if bad else ""))
    return list(dict.fromkeys(int(x) for x in items))


def build_parser() -> argparse.ArgumentParser:
    keys = _size_keys()
    cases_help = "; ".join(
        f"{c.name}: {sizes_label({k: v for k, v in c.sizes.items() if v is not None})}" for c in CASES.values())
    p = argparse.ArgumentParser(
        prog="distillx bench",
        description=__doc__.split("\n\n")[0].replace("``", "") + " Times forward+backward and peak extra memory per case "
        "and implementation, checks distillx against eager, prints a table and optionally writes JSON.",
        epilog=(
            "examples:\n"
            "  distillx bench                                  # every case at its default sizes, three impls\n"
            "  distillx bench --cases logit_kd --N 8192 --C 128256 --dtype bfloat16 --device cuda\n"
            "  distillx bench --impls eager,distillx --divergence jsd --json bench.json\n"
            "  distillx bench --size linear_kd.N=1024 --param linear_kd.chunk_size=256\n"
            "  distillx bench --quick                          # tiny sizes, for tests and CI\n"
            f"\ndefault sizes: {cases_help}\n"
            "A size flag applies to every selected case that has that size; --size CASE.KEY=VALUE to one case."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sel = p.add_argument_group("what to run")
    sel.add_argument("--cases", type=_csv(list(CASES), "case"), default=list(CASES),
                     help=f"comma-separated cases (default: all: {','.join(CASES)})")
    sel.add_argument("--impls", type=_csv(IMPLS, "implementation"), default=list(IMPLS),
                     help=f"comma-separated implementations (default: {','.join(IMPLS)})")
    sel.add_argument("--list", action="store_true", help="list the cases with their sizes and parameters, then exit")
    sel.add_argument("--quick", action="store_true",
                     help=f"tiny sizes, {QUICK_REPEATS} repeats, {QUICK_WARMUP} warm-up (tests, CI); size flags still apply")

    sz = p.add_argument_group("sizes and parameters")
    for key in keys:
        owners = [c for c in CASES.values() if key in c.sizes]
        doc = next((c.size_doc[key] for c in owners if key in c.size_doc), f"size {key}")
        defaults = ", ".join(c.name + ("" if c.sizes[key] is None else f" {c.sizes[key]}") for c in owners)
        sz.add_argument(f"--{key}", type=_positive_int, default=None, dest=f"size_{key}", metavar="INT",
                        help=f"{doc} [{defaults}]")
    sz.add_argument("--size", type=_assignment, action="append", default=[], metavar="[CASE.]KEY=INT",
                    help="set a size, optionally for one case only (repeatable)")
    sz.add_argument("--dtype", choices=list(DTYPES), default="float32", help="input dtype (default: float32)")
    sz.add_argument("--divergence", choices=["kl", "reverse_kl", "jsd"], default=None,
                    help="divergence of the KD cases (default: kl)")
    sz.add_argument("--temperature", type=float, default=None, help="softmax temperature of the KD cases (default: 2.0)")
    sz.add_argument("--param", type=_assignment, action="append", default=[], metavar="[CASE.]KEY=VALUE",
                    help="set a keyword argument of the case's functions, e.g. beta=0.3, linear_kd.chunk_size=256 "
                         "(repeatable; --list shows them)")

    run = p.add_argument_group("how to run")
    run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    run.add_argument("--repeats", type=_positive_int, default=None, help="timed repeats (default: 5; --quick: 3)")
    run.add_argument("--max-time", type=float, default=30.0, metavar="SECONDS",
                     help="stop the timed repeats of a case x impl once they took this long, after at least 3 "
                          "(default: 30; 0: always --repeats)")
    run.add_argument("--warmup", type=int, default=None,
                     help="untimed calls before timing (default: 1; compile always gets at least 1)")
    run.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    run.add_argument("--threads", type=_threads, default=None, metavar="N[,M...]",
                     help="torch.set_num_threads in each measurement; a list (1,2) runs every measurement, "
                          "ceilings included, at each count (default: torch's default)")
    run.add_argument("--mm-size", type=_positive_int, default=None, metavar="INT",
                     help=f"side of the torch.mm ceiling's square matrices (default: {ceilings.MM_SIZE}; "
                          f"--quick: {ceilings.MM_SIZE_QUICK})")
    run.add_argument("--copy-mb", type=_positive_int, default=None, metavar="INT",
                     help=f"MB copied by the bandwidth ceiling (default: {ceilings.COPY_MB}; "
                          f"--quick: {ceilings.COPY_MB_QUICK})")
    run.add_argument("--no-isolate", dest="isolate", action="store_false",
                     help="measure in this process instead of one fresh subprocess per case x impl "
                          "(faster start; CPU memory numbers become approximate)")
    run.add_argument("--timeout", type=float, default=1800.0,
                     help="seconds allowed per case x impl subprocess (default: 1800)")

    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", default=None, help="write the environment and every measurement as JSON")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


# ---------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------

def _plan(ns, parser) -> List[Dict]:
    """Resolved sizes and parameters of every selected case."""
    size_over: Dict[Optional[str], Dict[str, int]] = {None: {}}
    for key in _size_keys():
        value = getattr(ns, f"size_{key}")
        if value is not None:
            size_over[None][key] = value
    for case_name, key, raw in ns.size:
        if case_name is not None and case_name not in CASES:
            parser.error(f"--size {case_name}.{key}: unknown case {case_name!r}")
        owners = [case_name] if case_name else [c for c in ns.cases]
        if not any(key in get_case(c).sizes for c in owners):
            parser.error(f"--size {key}: no selected case has a size {key!r}")
        try:
            size_over.setdefault(case_name, {})[key] = _positive_int(raw)
        except (ValueError, argparse.ArgumentTypeError):
            parser.error(f"--size {key}={raw}: must be a positive integer")

    param_over: Dict[Optional[str], Dict[str, object]] = {None: {}}
    if ns.divergence is not None:
        param_over[None]["divergence"] = ns.divergence
    if ns.temperature is not None:
        param_over[None]["temperature"] = ns.temperature
    for case_name, key, raw in ns.param:
        if case_name is not None and case_name not in CASES:
            parser.error(f"--param {case_name}.{key}: unknown case {case_name!r}")
        param_over.setdefault(case_name, {})[key] = _parse_value(raw)
    for scope, over in param_over.items():
        owners = [scope] if scope else ns.cases
        for key in over:
            if not any(key in get_case(c).params or key in get_case(c).fused_params for c in owners):
                parser.error(f"parameter {key!r} is not a parameter of {', '.join(owners)} (see --list)")

    plan = []
    for name in ns.cases:
        case = get_case(name)
        over = dict(size_over[None], **size_over.get(name, {}))
        try:
            sizes = case.resolve_sizes(quick=ns.quick, overrides=over)
        except ValueError as exc:
            parser.error(str(exc))
        params, fused = dict(case.params), dict(case.fused_params)
        for key, value in dict(param_over[None], **param_over.get(name, {})).items():
            if key in params:
                params[key] = value
            elif key in fused:
                fused[key] = value
        plan.append({"case": name, "sizes": sizes, "params": params, "fused_params": fused})
    return plan


def _list_cases() -> None:
    for case in CASES.values():
        print(f"{case.name}: {case.description}")
        print(f"    sizes:  {sizes_label({k: v for k, v in case.sizes.items() if v is not None})}"
              f"   (--quick: {sizes_label({k: v for k, v in case.quick.items() if v is not None})})")
        print(f"    params: {', '.join(f'{k}={v!r}' for k, v in case.params.items()) or '-'}")
        if case.fused_params:
            print(f"    distillx-only params: {', '.join(f'{k}={v!r}' for k, v in case.fused_params.items())}")
        print(f"    eager/compile: {case.reference}   distillx: {case.fused}")


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if ns.list:
        _list_cases()
        return 0
    try:
        device = torch.device(ns.device)
    except RuntimeError as exc:
        parser.error(f"--device {ns.device}: {exc}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {ns.device}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available to this torch")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    repeats = ns.repeats or (QUICK_REPEATS if ns.quick else 5)
    warmup = ns.warmup if ns.warmup is not None else (QUICK_WARMUP if ns.quick else 1)
    if warmup < 0:
        parser.error("--warmup must be >= 0")
    plan = _plan(ns, parser)
    thread_counts = ns.threads or [None]
    mm_size = ns.mm_size or (ceilings.MM_SIZE_QUICK if ns.quick else ceilings.MM_SIZE)
    copy_mb = ns.copy_mb or (ceilings.COPY_MB_QUICK if ns.quick else ceilings.COPY_MB)

    def progress(msg: str) -> None:
        if not ns.quiet:
            print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    report: Dict = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv[1:] if argv is None else argv),
        "config": {"cases": ns.cases, "impls": ns.impls, "dtype": ns.dtype, "device": str(device),
                   "repeats": repeats, "warmup": warmup, "max_time_s": ns.max_time or None, "quick": ns.quick,
                   "seed": ns.seed,
                   "threads": ns.threads, "isolate": ns.isolate,
                   "mm_size": mm_size, "copy_mb": copy_mb},
        "environment": environment(device),
        "memory_method": {},
        "results": [],
    }
    if device.type == "cuda":
        report["memory_method"]["description"] = "torch.cuda.max_memory_allocated - memory_allocated before the call"
    else:
        report["memory_method"]["description"] = (
            "peak RSS growth (VmHWM after clear_refs - VmRSS), glibc returning freed blocks >= 64 KiB to the OS, "
            + ("one fresh process per case x impl" if ns.isolate else "in-process (approximate)"))
        calib = run_isolated({"calibrate": True}, timeout=120) if ns.isolate else run_spec({"calibrate": True})
        if "calibration" in calib:
            report["memory_method"]["calibration"] = calib["calibration"]
            c = calib["calibration"]
            measured = c.get("measured_alloc_mb")
            if measured is None or abs(measured - c["alloc_mb"]) > 0.1 * c["alloc_mb"] or (c.get("noop_mb") or 0) > 8:
                progress(f"warning: the CPU memory method looks off: {c}")
        else:
            report["memory_method"]["calibration_error"] = calib.get("error")

    by_threads = {}
    for threads in thread_counts:
        progress(f"ceilings at {threads or 'default'} threads: torch.mm {mm_size}x{mm_size}, copy_ {copy_mb} MB ...")
        spec = {"ceilings": True, "dtypes": list(dict.fromkeys(["float32", ns.dtype])), "device": str(device),
                "threads": threads, "mm_size": mm_size, "copy_mb": copy_mb}
        res = run_isolated(spec, timeout=ns.timeout) if ns.isolate else run_spec(spec)
        ceiling = res.get("ceilings") or {"error": res.get("error", "no result"), "threads_requested": threads}
        report["environment"].setdefault("ceilings", []).append(ceiling)
        if not ceiling.get("error"):
            by_threads[ceiling["threads"]] = ceiling
        progress("      " + ceilings.describe(ceiling))

    total = len(plan) * len(ns.impls) * len(thread_counts)
    index = 0
    for item in plan:
        for threads in thread_counts:
            label = f"{item['case']} {sizes_label(item['sizes'])} {ns.dtype}" + (f" {threads}t" if threads else "")
            for impl in ns.impls:
                index += 1
                progress(f"[{index}/{total}] {label} {impl} ...")
                spec = dict(item, impl=impl, dtype=ns.dtype, device=str(device), repeats=repeats, warmup=warmup,
                            max_time_s=ns.max_time or None, seed=ns.seed, threads=threads)
                t0 = time.perf_counter()
                res = run_isolated(spec, timeout=ns.timeout) if ns.isolate else run_spec(dict(spec, isolated=False))
                # "threads": the count the measurement ran with (its own report), else the one asked for
                row = dict(item, impl=impl, dtype=ns.dtype, device=str(device), threads=threads)
                row.update(res)
                report["results"].append(row)
                if res.get("error"):
                    progress(f"      error: {res['error']}")
                else:
                    extra = f", compiled in {res['compile_s']:.1f} s" if res.get("compile_s") is not None else ""
                    progress(f"      median {fmt_ms(res.get('median_ms'))} ms of {len(res['times_ms'])}, "
                             f"peak {fmt_mb(res.get('peak_mb'))} MB{extra} ({time.perf_counter() - t0:.1f} s)")
    summarise(report["results"], ns.dtype, by_threads)
    report["total_s"] = time.perf_counter() - started

    env = report["environment"]
    threads_label = ",".join(map(str, ns.threads)) if ns.threads else str(env["torch_threads"])
    print(f"distillx bench: torch {env['torch']}, {env['device']}"
          + (f" ({env['gpu']})" if env.get("gpu") else
             f" ({env['cpu']}, {threads_label} threads, CPU kernels {env.get('distillx_cpu_isa') or 'none'})")
          + f", up to {repeats} timed repeats (n) after {warmup} warm-up"
          + (f", at most {ns.max_time:g} s of repeats after the first 3" if ns.max_time else ""))
    for ceiling in env.get("ceilings", []):
        print(ceilings.describe(ceiling))
    print(format_table(report["results"]))
    print()
    for note in notes(report):
        print(note)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
            f.write("\n")
        print(f"wrote {ns.json}")
    failed = (any(r.get("error") or (r.get("check") or {}).get("status") == "mismatch" for r in report["results"])
              or any(c.get("error") for c in env.get("ceilings", [])))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
