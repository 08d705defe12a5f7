"""`distillx bench`: JSON and table of every case x implementation, flags, the memory method, checks.

No timing assertions: the numbers depend on the machine and its load.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from distillx.cli import bench
from distillx import _ext
from distillx.benchmarks import CASES, Case, report, runner, timing
from distillx.ops import has_kernel
from distillx.benchmarks.cases import Inputs


def _load(path):
    with open(path) as f:
        return json.load(f)


def _assert_measured(row):
    assert not row.get("error"), row.get("error")
    assert row["times_ms"] and all(t > 0 for t in row["times_ms"])
    assert row["median_ms"] > 0 and 0 < row["min_ms"] <= row["median_ms"]
    assert isinstance(row["peak_mb"], float) and row["peak_mb"] >= 0
    assert row["memory_method"] in ("clear_refs", "sampled", "cuda_max_memory_allocated")
    assert row["loss_finite"] and row["loss"] is not None
    assert row["grads"] and all(g is not None and g["norm"] > 0 for g in row["grads"].values())


def test_quick_eager_and_distillx_every_case(tmp_path, capsys):
    path = tmp_path / "b.json"
    # In this process (--no-isolate): the fresh process per case x impl is covered by the
    # single-case and thread-count tests, and 20 interpreter starts cost two minutes here.
    rc = bench.main(["--quick", "--impls", "eager,distillx", "--no-isolate", "--json", str(path), "-q"])
    out = capsys.readouterr().out
    report = _load(path)

    assert rc == 0, out
    rows = {(r["case"], r["impl"]): r for r in report["results"]}
    assert set(rows) == {(c, i) for c in CASES for i in ("eager", "distillx")}
    for row in rows.values():
        _assert_measured(row)
        assert row["check"]["status"] == ("reference" if row["impl"] == "eager" else "ok"), row["check"]
    for case in CASES:
        assert rows[(case, "distillx")]["speedup_vs_eager"] > 0
        assert rows[(case, "distillx")]["speedup_vs_compile"] is None  # compile not run
        # the distillx column ran the fused kernel wherever this build has one for the case's op
        op = CASES[case].op
        want = "compiled" if _ext.available() and (op is None or has_kernel(op, "cpu")) else "reference"
        assert rows[(case, "distillx")]["distillx_backend"] == want, case
        # a floor wherever the case has a cost model, measured against this run's ceilings
        for impl in ("eager", "distillx"):
            row = rows[(case, impl)]
            if CASES[case].cost is None:
                assert row["floor"] is None and row["floor_fraction"] is None
            else:
                assert row["floor_ms"] > 0 and row["floor_fraction"] > 0, (case, impl)
    assert rows[("linear_kd", "eager")]["sizes"] == {"N": 64, "Hs": 32, "Ht": 32, "C": 512}

    env = report["environment"]
    for key in ("torch", "device", "cpu", "torch_threads", "distillx_build_info", "distillx_compiled"):
        assert key in env
    assert report["config"]["impls"] == ["eager", "distillx"] and report["config"]["quick"]
    # which ISA's CPU kernels the numbers come from, in the JSON and the table's first line
    assert env["distillx_cpu_isa"] == _ext.cpu_isa()
    assert f"CPU kernels {_ext.cpu_isa() or 'none'})" in out.splitlines()[0]
    (ceiling,) = env["ceilings"]
    assert ceiling["copy_gbps"] > 0 and all(r["threads"] == ceiling["threads"] for r in report["results"])
    calib = report["memory_method"]["calibration"]
    assert calib["noop_mb"] is not None and calib["measured_alloc_mb"] is not None

    # the table: header, one line per case x impl, the notes
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("case "))
    for col in ("sizes", "dtype", "impl", "median ms", "min ms", "peak MB", "floor ms", "% floor", "x eager",
                "x compile", "check"):
        assert col in header
    for case in CASES:
        for impl in ("eager", "distillx"):
            assert any(line.startswith(case) and f" {impl} " in line for line in lines), (case, impl, out)
    assert f"wrote {path}" in out


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_quick_compile_single_case(tmp_path, capsys, monkeypatch):
    # One compile worker: a pool of one per core takes longer to start than these tiny graphs take to build.
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")
    path = tmp_path / "c.json"
    rc = bench.main(["--quick", "--cases", "logit_kd", "--impls", "eager,compile,distillx",
                     "--repeats", "2", "--json", str(path), "-q"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = {r["impl"]: r for r in _load(path)["results"]}
    assert set(rows) == {"eager", "compile", "distillx"}
    for row in rows.values():
        _assert_measured(row)
        assert len(row["times_ms"]) == 2
    assert rows["compile"]["compile_s"] is not None and rows["compile"]["compile_s"] >= 0
    assert rows["compile"]["check"]["status"] == "ok"
    assert rows["distillx"]["speedup_vs_compile"] > 0


def test_memory_method_is_sane():
    """A no-op measures ~0 MB and allocating + freeing 400 MB measures ~400 MB, in a fresh process."""
    out = runner.run_isolated({"calibrate": True}, timeout=120)
    assert "calibration" in out, out
    c = out["calibration"]
    if c["method"] == "unavailable":
        pytest.skip("no /proc on this system")
    assert c["noop_mb"] < 5, c
    assert abs(c["measured_alloc_mb"] - 400) < 40, c


def test_sizes_and_params_flags():
    parser = bench.build_parser()
    ns = parser.parse_args(["--N", "128", "--H", "16", "--size", "linear_kd.C=256", "--Ht", "24",
                            "--divergence", "jsd", "--param", "beta=0.25", "--param", "linear_kd.chunk_size=32"])
    plan = {p["case"]: p for p in bench._plan(ns, parser)}
    assert plan["logit_kd"]["sizes"] == {"N": 128, "C": 32000}
    assert plan["linear_kd"]["sizes"] == {"N": 128, "Hs": 16, "Ht": 24, "C": 256}
    assert plan["logit_kd"]["params"]["divergence"] == "jsd"
    assert plan["linear_kd"]["fused_params"] == {"chunk_size": 32}
    assert "chunk_size" not in plan["linear_kd"]["params"]  # distillx-only parameter

    ns = parser.parse_args(["--quick", "--cases", "linear_kd", "--temperature", "4"])
    (only,) = bench._plan(ns, parser)
    assert only["sizes"] == dict(CASES["linear_kd"].resolve_sizes(quick=True))
    assert only["params"]["temperature"] == 4.0


@pytest.mark.parametrize("argv", [
    ["--cases", "nope"],
    ["--impls", "eager,fast"],
    ["--N", "0"],
    ["--size", "logit_kd.H=3"],
    ["--size", "nope.N=3"],
    ["--param", "nope=1"],
    ["--dtype", "int8"],
])
def test_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2


def test_list_and_cli_dispatch(capsys):
    from distillx import cli

    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name, case in CASES.items():
        assert name in out and case.reference in out and case.fused in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--cases", "--impls", "--N", "--C", "--H", "--size", "--dtype", "--device", "--repeats",
                 "--warmup", "--json", "--quick"):
        assert flag in help_text


def test_check_flags_mismatch():
    ref = {"loss": 1.0, "loss_finite": True, "grads": {"s": {"norm": 2.0, "probe": 0.5}}}
    assert report.check_against(ref, ref, 1e-4) == []
    assert report.check_against(ref, dict(ref, loss=1.01), 1e-4)
    assert report.check_against(ref, dict(ref, grads={"s": {"norm": 2.0, "probe": -0.5}}), 1e-4)
    assert report.check_against(ref, dict(ref, grads={"s": None}), 1e-4)


def test_timing_repeats_and_time_budget():
    import time

    x = torch.ones(3, requires_grad=True)

    def slow():
        time.sleep(0.02)
        return (x * 2).sum()

    out = timing.time_forward_backward(slow, [x], torch.device("cpu"), repeats=10, warmup=2, max_time_s=0.03)
    assert len(out["warmup_s"]) == 2 and len(out["times_ms"]) == timing.MIN_REPEATS
    assert out["min_ms"] >= 20 and x.grad is None  # gradients cleared after timing
    out = timing.time_forward_backward(slow, [x], torch.device("cpu"), repeats=2, warmup=0, max_time_s=None)
    assert out["warmup_s"] == [] and len(out["times_ms"]) == 2


def _broken(*args, **kwargs):
    raise RuntimeError("kernel exploded")


def _wrong(student_logits, teacher_logits, **kwargs):
    from distillx.ops.reference import kd_loss_reference
    return 1.5 * kd_loss_reference(student_logits, teacher_logits, **kwargs)


def _build_tiny(sizes, dtype, device, gen):
    return Inputs(args={"s": torch.randn(sizes["N"], 8, generator=gen, dtype=dtype, device=device).requires_grad_(),
                        "t": torch.randn(sizes["N"], 8, generator=gen, dtype=dtype, device=device)})


@pytest.fixture
def extra_cases():
    """Two throwaway cases (in-process only: a subprocess would not see them)."""
    added = []
    for name, fused in (("tiny_broken", f"{__name__}:_broken"), ("tiny_wrong", f"{__name__}:_wrong")):
        added.append(name)
        CASES[name] = Case(name=name, description="test", reference="distillx.ops.reference:kd_loss_reference",
                           fused=fused, build=_build_tiny, sizes={"Ntiny": 4}, quick={"Ntiny": 4},
                           resolve=lambda s: {"N": s["Ntiny"]}, params={"temperature": 1.0})
    yield added
    for name in added:
        CASES.pop(name, None)


def test_errors_and_mismatches_are_reported(extra_cases, tmp_path, capsys):
    path = tmp_path / "e.json"
    rc = bench.main(["--cases", ",".join(extra_cases), "--impls", "eager,distillx", "--no-isolate",
                     "--repeats", "1", "--json", str(path), "-q"])
    out = capsys.readouterr().out
    assert rc == 1
    rows = {(r["case"], r["impl"]): r for r in _load(path)["results"]}
    assert "kernel exploded" in rows[("tiny_broken", "distillx")]["error"]
    assert rows[("tiny_broken", "eager")]["check"]["status"] == "reference"
    assert rows[("tiny_wrong", "distillx")]["check"]["status"] == "mismatch"
    assert "ERROR" in out and "MISMATCH" in out and "kernel exploded" in out
