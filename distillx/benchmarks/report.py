"""What ``distillx bench`` makes of its measurements: the check of every implementation against
eager, the speed-up columns, the floor (:mod:`.ceilings`) and the fraction of it achieved, the
thread speed-up, the table and the notes under it."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

from . import ceilings as ceil
from .cases import get_case, sizes_label
from .runner import DTYPES

# Relative tolerance of the loss / gradient check against eager, by dtype (float64 inputs may
# accumulate in float32, hence the same bound as float32). A case may override per dtype.
RTOL = {"float64": 1e-4, "float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}



def check_against(ref: Dict, got: Dict, rtol: float) -> List[str]:
    """Problems of ``got`` (loss, gradient norms and probes) against the eager result ``ref``."""
    problems = []
    if not got.get("loss_finite", True):
        problems.append("loss is not finite")
    if ref.get("loss") is not None and got.get("loss") is not None:
        a, b = got["loss"], ref["loss"]
        if abs(a - b) > rtol * abs(b) + 1e-7:
            problems.append(f"loss {a:.6g} vs eager {b:.6g}")
    for name, rg in (ref.get("grads") or {}).items():
        gg = (got.get("grads") or {}).get(name)
        if rg is None:
            continue
        if gg is None:
            problems.append(f"no gradient for {name}")
            continue
        scale = rg["norm"]
        for key in ("norm", "probe"):
            if not math.isfinite(gg[key]) or abs(gg[key] - rg[key]) > rtol * scale + 1e-12:
                problems.append(f"grad {name} {key} {gg[key]:.6g} vs eager {rg[key]:.6g}")
    return problems


def summarise(results: List[Dict], dtype: str, ceilings: Optional[Dict[int, Dict]] = None) -> None:
    """Add speed-ups, memory ratios, the eager check, the floor and the thread speed-up to every
    result (in place). Rows are compared within one (case, threads) group; ``ceilings`` maps a
    thread count to that run's ceilings (:func:`.ceilings.measure`)."""
    groups: Dict[tuple, Dict[str, Dict]] = {}
    for r in results:
        groups.setdefault((r["case"], r.get("threads")), {})[r["impl"]] = r
    for (case_name, threads), by_impl in groups.items():
        case = get_case(case_name)
        rtol = case.rtol.get(dtype, RTOL[dtype])
        eager, compiled = by_impl.get("eager"), by_impl.get("compile")
        for impl, r in by_impl.items():
            ok = not r.get("error") and r.get("median_ms")
            for name, base in (("eager", eager), ("compile", compiled)):
                good_base = base is not None and not base.get("error") and base.get("median_ms")
                r[f"speedup_vs_{name}"] = base["median_ms"] / r["median_ms"] if ok and good_base else None
                r[f"memory_ratio_vs_{name}"] = (
                    r["peak_mb"] / base["peak_mb"]
                    if ok and good_base and r.get("peak_mb") is not None and base.get("peak_mb") else None)
            _add_floor(r, case, dtype, (ceilings or {}).get(threads))
            if r.get("error"):
                r["check"] = {"status": "error", "problems": [r["error"]]}
            elif impl == "eager":
                finite = r.get("loss_finite", True)
                r["check"] = {"status": "reference" if finite else "mismatch",
                              "problems": [] if finite else ["eager loss is not finite"]}
            elif eager is None or eager.get("error"):
                r["check"] = {"status": "unchecked", "problems": [], "rtol": rtol}
            else:
                problems = check_against(eager, r, rtol)
                r["check"] = {"status": "mismatch" if problems else "ok", "problems": problems, "rtol": rtol}
    _add_thread_speedup(results)


def _add_floor(r: Dict, case, dtype: str, ceiling: Optional[Dict]) -> None:
    """``floor`` (see :func:`.ceilings.floor`), ``floor_ms`` and ``floor_fraction = floor_ms / median``."""
    cost = case.cost(r["sizes"], DTYPES[dtype], r.get("params") or {}) if case.cost else None
    r["floor"] = ceil.floor(cost, ceiling, dtype)
    r["floor_ms"] = r["floor"]["ms"] if r["floor"] else None
    r["floor_fraction"] = (r["floor_ms"] / r["median_ms"]
                           if r["floor_ms"] is not None and not r.get("error") and r.get("median_ms") else None)


def _add_thread_speedup(results: List[Dict]) -> None:
    """``thread_speedup = median at the fewest threads / this median`` within (case, impl), and
    ``thread_speedup_base`` that thread count; None on the base row itself and with one count."""
    by: Dict[tuple, List[Dict]] = {}
    for r in results:
        by.setdefault((r["case"], r["impl"]), []).append(r)
    for rows in by.values():
        good = [r for r in rows if not r.get("error") and r.get("median_ms") and r.get("threads")]
        base = min(good, key=lambda r: r["threads"]) if good else None
        for r in rows:
            faster = base is not None and any(r is g for g in good) and r["threads"] > base["threads"]
            r["thread_speedup"] = base["median_ms"] / r["median_ms"] if faster else None
            r["thread_speedup_base"] = base["threads"] if faster else None


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

def fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def fmt_x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def fmt_mb(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


_CHECK_LABEL = {"ok": "ok", "reference": "ref", "mismatch": "MISMATCH", "error": "ERROR", "unchecked": "-"}


def fmt_pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def thread_column(results: List[Dict]) -> Optional[str]:
    """Header of the thread speed-up column: ``"2t/1t"`` for two thread counts, ``"x 1t"`` for more
    (over the fewest), None with a single count."""
    counts = sorted({r["threads"] for r in results if r.get("threads")})
    if len(counts) < 2:
        return None
    return f"{counts[1]}t/{counts[0]}t" if len(counts) == 2 else f"x {counts[0]}t"


def format_table(results: List[Dict]) -> str:
    """One line per case x threads x impl; the thread speed-up column (distillx rows) only with
    several thread counts."""
    speed = thread_column(results)
    header = ["case", "sizes", "dtype", "thr", "impl", "n", "median ms", "min ms", "peak MB", "compile s",
              "floor ms", "bound", "% floor", "x eager", "x compile"] + ([speed] if speed else []) + ["check"]
    right = {"thr", "n", "median ms", "min ms", "peak MB", "compile s", "floor ms", "% floor", "x eager",
             "x compile", speed}
    rows = []
    for r in results:
        impl = r["impl"]
        floor = r.get("floor") or {}
        rows.append([
            r["case"], sizes_label(r["sizes"]), r["dtype"], str(r.get("threads") or "-"), impl,
            str(len(r.get("times_ms") or [])),
            fmt_ms(r.get("median_ms")), fmt_ms(r.get("min_ms")), fmt_mb(r.get("peak_mb")),
            "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}",
            fmt_ms(r.get("floor_ms")), floor.get("bound", "-"), fmt_pct(r.get("floor_fraction")),
            fmt_x(r.get("speedup_vs_eager")) if impl != "eager" else "",
            fmt_x(r.get("speedup_vs_compile")) if impl == "distillx" else "",
        ] + ([fmt_x(r.get("thread_speedup")) if impl == "distillx" and r.get("thread_speedup_base") else ""]
             if speed else []) + [
            _CHECK_LABEL.get((r.get("check") or {}).get("status"), "?"),
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(cells, widths, header)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    previous = None
    for r, row in zip(results, rows):
        if previous is not None and (r["case"], r.get("threads")) != previous:
            out.append("")
        previous = (r["case"], r.get("threads"))
        out.append(line(row))
    return "\n".join(out)


def notes(report: Dict) -> List[str]:
    notes = []
    env = report["environment"]
    load, cores = env.get("loadavg_at_start"), env.get("cpu_affinity") or env.get("cpu_count")
    if load and cores and report["config"]["device"] == "cpu" and load[0] > 0.5 * cores:
        notes.append(f"WARNING: the machine was busy when the run started (load average {load[0]:.1f} on {cores} "
                     "cores): CPU timings are unreliable; rerun on an idle machine.")
    if "distillx" in report["config"]["impls"] and not env.get("distillx_compiled"):
        notes.append(f"NOTE: distillx._C is not loaded ({env.get('distillx_missing_reason')}).")
    for r in report["results"]:
        if r["impl"] == "distillx" and not r.get("error") and r.get("distillx_backend") != "compiled":
            notes.append(f"NOTE: {r['case']}: the distillx column ran the {r.get('distillx_backend')} "
                         f"implementation (no compiled {r['device']} kernel), not a fused kernel.")
        check = r.get("check") or {}
        if check.get("status") == "mismatch":
            notes.append(f"WARNING: {r['case']} {r['impl']} disagrees with eager (rtol {check.get('rtol')}): "
                         + "; ".join(check["problems"]))
        if r.get("error"):
            notes.append(f"ERROR: {r['case']} {r['impl']}: {r['error']}")
        if r.get("memory_note"):
            notes.append(f"memory ({r['case']} {r['impl']}): {r['memory_note']}")
    mem = report.get("memory_method") or {}
    if mem.get("calibration"):
        c = mem["calibration"]
        notes.append(f"memory method: {mem['description']}; check: no-op {fmt_mb(c.get('noop_mb'))} MB, "
                     f"{c.get('alloc_mb'):.0f} MB alloc+free {fmt_mb(c.get('measured_alloc_mb'))} MB")
    elif mem.get("description"):
        notes.append(f"memory method: {mem['description']}")
    for c in env.get("ceilings") or []:
        if c.get("error"):
            notes.append(f"ERROR: ceilings at {c.get('threads_requested') or 'default'} threads: {c['error']}")
    notes.append("median/min over the n timed repeats of forward+backward; thr = torch threads; peak MB = peak "
                 "extra memory over the inputs (MB = 1e6 B); floor ms = max(GEMM FLOPs / torch.mm rate, minimum "
                 "bytes / copy bandwidth) at the same threads, bound = which term; % floor = floor / median; "
                 "x eager / x compile = their median / this median"
                 + (f"; {thread_column(report['results'])} = distillx's median at the fewest threads / this one"
                    if thread_column(report["results"]) else "")
                 + "; check = loss and gradients against eager (ref).")
    return notes


