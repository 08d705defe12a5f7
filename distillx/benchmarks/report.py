"""What ``distillx bench`` makes of its measurements: the check of every implementation against
eager, the speed-up columns, the table and the notes under it."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

from .cases import get_case, sizes_label

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


def summarise(results: List[Dict], dtype: str) -> None:
    """Add speed-ups, memory ratios and the eager check to every result (in place)."""
    groups: Dict[str, Dict[str, Dict]] = {}
    for r in results:
        groups.setdefault(r["case"], {})[r["impl"]] = r
    for case_name, by_impl in groups.items():
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


def format_table(results: List[Dict]) -> str:
    header = ["case", "sizes", "dtype", "impl", "n", "median ms", "min ms", "peak MB", "compile s",
              "x eager", "x compile", "check"]
    right = {"n", "median ms", "min ms", "peak MB", "compile s", "x eager", "x compile"}
    rows = []
    for r in results:
        impl = r["impl"]
        rows.append([
            r["case"], sizes_label(r["sizes"]), r["dtype"], impl, str(len(r.get("times_ms") or [])),
            fmt_ms(r.get("median_ms")), fmt_ms(r.get("min_ms")), fmt_mb(r.get("peak_mb")),
            "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}",
            fmt_x(r.get("speedup_vs_eager")) if impl != "eager" else "",
            fmt_x(r.get("speedup_vs_compile")) if impl == "distillx" else "",
            _CHECK_LABEL.get((r.get("check") or {}).get("status"), "?"),
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(cells, widths, header)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    previous = None
    for r, row in zip(results, rows):
        if previous is not None and r["case"] != previous:
            out.append("")
        previous = r["case"]
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
    notes.append("median/min over the n timed repeats of forward+backward; peak MB = peak extra memory over the "
                 "inputs (MB = 1e6 B); x eager / x compile = their median / this median; check = loss and "
                 "gradients against eager (ref).")
    return notes


