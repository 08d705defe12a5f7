"""`distillx bench`'s ceilings, cost models and floors, and ``--threads`` lists.

No timing assertions: a measured rate or time is only checked to be a positive finite number.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from distillx.benchmarks import CASES, ceilings, report, runner
from distillx.benchmarks.cases import load_callable
from distillx.cli import bench

F32, BF16 = torch.float32, torch.bfloat16

# (case, sizes, dtype, flops, bytes), worked out by hand from each formula's GEMMs and tensors.
HAND = [
    # 0 GEMMs; 3 (N, C) tensors: 3·2·3 = 18 elements
    ("logit_kd", {"N": 2, "C": 3}, F32, 0, 18 * 4),
    ("logit_kd", {"N": 2, "C": 3}, BF16, 0, 18 * 2),
    # GEMMs 2·2·3·4 (h_s W_sᵀ) + 2·2·3·5 (h_t W_tᵀ) + 48 (∂h_s) + 48 (∂W_s) = 204;
    # h_s 8 + W_s 12 + h_t 10 + W_t 15 + ∂h_s 8 + ∂W_s 12 = 65 elements
    ("linear_kd", {"N": 2, "C": 3, "Hs": 4, "Ht": 5}, F32, 204, 65 * 4),
    # Grams 3²·2 + 3²·4 = 54, gradient 2·3²·2 = 36: 90; s 6 + t 12 + ∂s 6 = 24 elements
    ("gram_rbf", {"N": 3, "Ds": 2, "Dt": 4}, F32, 90, 24 * 4),
    ("sp_rbf", {"N": 3, "Ds": 2, "Dt": 4}, F32, 90, 24 * 4),
    # 0 GEMMs; f_s 1·2·2·3 = 12, f_t 1·1·2·3 = 6, ∂f_s 12: 30 elements
    ("attention_map", {"B": 1, "Cs": 2, "Ct": 1, "H": 2, "W": 3}, F32, 0, 30 * 4),
    # per head 2·3²·2 (q_s k_sᵀ) + 2·3²·4 (q_t k_tᵀ) + 2·(2·3²·2) (∂q_s, ∂k_s) = 180, 2 heads: 360;
    # q_s, k_s 6 each, q_t, k_t 12 each, ∂q_s, ∂k_s 6 each = 48 per head: 96 elements
    ("attention_relation", {"BA": 2, "L": 3, "ds": 2, "dt": 4}, F32, 360, 96 * 4),
    # s Sᵀ 2²·3 = 12, t Tᵀ 3²·3 = 27, s tᵀ 2·2·3·3 = 36, ∂s: 2·2²·3 = 24 + 2·2·3·3 = 36: 135;
    # s 6 + t 9 + ∂s 6 = 21 elements
    ("mmd_rbf", {"N": 2, "M": 3, "D": 3}, F32, 135, 21 * 4),
]


@pytest.mark.parametrize("name,sizes,dtype,flops,nbytes", HAND, ids=[f"{h[0]}-{h[2]}" for h in HAND])
def test_cost_models_by_hand(name, sizes, dtype, flops, nbytes):
    case = CASES[name]
    assert case.cost(sizes, dtype, case.params) == {"flops": flops, "bytes": nbytes}


@pytest.mark.parametrize("name", ["logit_kd", "linear_kd", "gram_rbf", "sp_rbf", "attention_map",
                                  "attention_relation", "mmd_rbf"])
def test_cost_bytes_are_inputs_plus_gradients(name):
    """The byte count is every built input once plus every gradient leaf once, at quick sizes."""
    case = CASES[name]
    sizes = case.resolve_sizes(quick=True)
    for dtype in (F32, BF16):
        inputs = case.build(sizes, dtype, torch.device("cpu"), torch.Generator().manual_seed(0))
        grads = sum(t.numel() * t.element_size() for _, t in inputs.grad_leaves())
        assert case.cost(sizes, dtype, case.params)["bytes"] == inputs.nbytes() + grads


def _reference_gemm_flops(name):
    """GEMM FLOPs of the eager reference's forward+backward, counted by torch (2·m·n·k per product)."""
    case = CASES[name]
    sizes = case.resolve_sizes(quick=True)
    inputs = case.build(sizes, F32, torch.device("cpu"), torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        load_callable(case.reference)(*inputs.args.values(), **inputs.kwargs, **case.params).backward()
    return counter.get_total_flops(), case.cost(sizes, F32, case.params)["flops"]


@pytest.mark.parametrize("name", ["linear_kd", "attention_relation"])
def test_cost_flops_match_the_reference_gemms(name):
    counted, modelled = _reference_gemm_flops(name)
    assert counted == modelled > 0


def test_gram_cost_is_half_the_references_full_grams():
    # The reference forms both full Grams (2·N²·D each) and differentiates s sᵀ through both operands
    # (2 · 2·N²·Ds); the model counts the upper triangles (N²·D) and one gradient product (2·N²·Ds).
    counted, modelled = _reference_gemm_flops("gram_rbf")
    assert counted == 2 * modelled > 0


def test_no_floor_where_the_model_does_not_hold():
    gram = CASES["gram_rbf"]
    sizes = gram.resolve_sizes(quick=True)
    assert gram.cost(sizes, F32, dict(gram.params, kernel="linear")) is None
    assert CASES["mmd_rbf"].cost(CASES["mmd_rbf"].resolve_sizes(quick=True), F32, {"kernel": "cosine"}) is None
    for name in ("lm_kd", "gkd", "gkd_128k"):
        if name in CASES:
            assert CASES[name].cost is None


def test_ceilings_are_positive_and_finite():
    out = ceilings.measure({"float32": F32, "bfloat16": BF16}, torch.device("cpu"), mm_size=32, copy_mb=1,
                           repeats=1)
    assert out["threads"] == torch.get_num_threads() and out["mm_size"] == 32 and out["copy_mb"] == 1
    assert set(out["mm_gflops"]) == set(out["mm_sizes"]) == {"float32", "bfloat16"}
    for value in (*out["mm_gflops"].values(), out["copy_gbps"]):
        assert value > 0 and math.isfinite(value)


def test_ceilings_in_a_subprocess_at_a_thread_count():
    out = runner.run_isolated({"ceilings": True, "dtypes": ["float32"], "device": "cpu", "threads": 1,
                               "mm_size": 16, "copy_mb": 1, "repeats": 1}, timeout=120)
    assert out["ceilings"]["threads"] == 1, out
    assert runner.run_spec({"ceilings": True, "dtypes": ["int3"], "mm_size": 8, "copy_mb": 1})["error"].count("int3")


@pytest.mark.parametrize("call,name", [(lambda: ceilings.mm_gflops(0, F32, torch.device("cpu")), "n"),
                                       (lambda: ceilings.copy_gbps(0, torch.device("cpu")), "megabytes")])
def test_ceiling_sizes_are_checked(call, name):
    with pytest.raises(ValueError, match=f"size {name} must be a positive integer"):
        call()


def test_floor_is_the_larger_bound():
    ceiling = {"mm_gflops": {"float32": 100.0}, "copy_gbps": 10.0}
    # 2e9 FLOPs at 100 GFLOP/s: 20 ms; 1e9 bytes at 10 GB/s: 100 ms
    got = ceilings.floor({"flops": 2e9, "bytes": 1e9}, ceiling, "float32")
    assert got["ms"] == pytest.approx(100.0) and got["bound"] == "bytes"
    assert got["compute_ms"] == pytest.approx(20.0)
    got = ceilings.floor({"flops": 2e10, "bytes": 1e9}, ceiling, "float32")
    assert got["ms"] == pytest.approx(200.0) and got["bound"] == "flops"
    assert ceilings.floor(None, ceiling, "float32") is None
    assert ceilings.floor({"flops": 1, "bytes": 1}, None, "float32") is None
    assert ceilings.floor({"flops": 1, "bytes": 1}, ceiling, "bfloat16") is None  # no rate for that dtype


def test_half_floor_takes_the_better_gemm():
    """bfloat16 inputs may be multiplied in float32: the floor uses the faster of the two rates; a
    float64 run never borrows the float32 rate."""
    ceiling = {"mm_gflops": {"float32": 100.0, "bfloat16": 2.0, "float64": 40.0}, "copy_gbps": 1000.0}
    assert ceilings.floor({"flops": 1e9, "bytes": 1}, ceiling, "bfloat16")["compute_ms"] == pytest.approx(10.0)
    assert ceilings.floor({"flops": 1e9, "bytes": 1}, ceiling, "float64")["compute_ms"] == pytest.approx(25.0)
    ceiling["mm_gflops"]["bfloat16"] = 400.0  # native bfloat16 GEMMs (AMX): their rate
    assert ceilings.floor({"flops": 1e9, "bytes": 1}, ceiling, "bfloat16")["compute_ms"] == pytest.approx(2.5)


def test_a_slow_dtype_is_measured_at_a_smaller_size(monkeypatch):
    """A probe predicting more than the budget shrinks n (a multiple of 64, at least the probe's 256)."""
    calls = []

    def fake(n, dtype, device, repeats=3):
        calls.append(n)
        return 1.0  # 1 GFLOP/s: 4096² takes 137 s a call
    monkeypatch.setattr(ceilings, "mm_gflops", fake)
    rate, n = ceilings.mm_rate(4096, BF16, torch.device("cpu"), repeats=3, budget_s=10.0)
    assert calls[0] == 256 and n == calls[-1] and n % 64 == 0 and 256 <= n < 4096
    assert 4 * 2 * n ** 3 / 1e9 <= 10.0 < 4 * 2 * (n + 64) ** 3 / 1e9
    calls.clear()
    monkeypatch.setattr(ceilings, "mm_gflops", lambda n, *a, **k: calls.append(n) or 1e6)
    assert ceilings.mm_rate(4096, F32, torch.device("cpu"))[1] == 4096 and calls == [256, 4096]
    assert ceilings.mm_rate(128, F32, torch.device("cpu"))[1] == 128 and calls[-1] == 128


def _row(threads, impl, median):
    return {"case": "logit_kd", "sizes": {"N": 1000, "C": 1000}, "params": dict(CASES["logit_kd"].params),
            "impl": impl, "dtype": "float32", "threads": threads, "median_ms": median, "loss": 1.0,
            "loss_finite": True, "grads": {}}


def test_summarise_floor_fraction_and_thread_speedup():
    rows = [_row(1, "eager", 40.0), _row(1, "distillx", 10.0), _row(2, "eager", 30.0), _row(2, "distillx", 5.0)]
    # 3·10⁶ float32 elements = 12e6 bytes at 6 GB/s: 2 ms at 1 thread; at 12 GB/s 1 ms at 2 threads
    ceils = {1: {"mm_gflops": {"float32": 50.0}, "copy_gbps": 6.0},
             2: {"mm_gflops": {"float32": 100.0}, "copy_gbps": 12.0}}
    report.summarise(rows, "float32", ceils)
    e1, d1, e2, d2 = rows
    assert d1["floor_ms"] == pytest.approx(2.0) and d1["floor"]["bound"] == "bytes"
    assert d1["floor_fraction"] == pytest.approx(0.2) and e1["floor_fraction"] == pytest.approx(0.05)
    assert d2["floor_ms"] == pytest.approx(1.0) and d2["floor_fraction"] == pytest.approx(0.2)
    assert d2["thread_speedup"] == pytest.approx(2.0) and d2["thread_speedup_base"] == 1
    assert e2["thread_speedup"] == pytest.approx(40 / 30)
    assert d1["thread_speedup"] is None and e1["thread_speedup"] is None
    assert d2["speedup_vs_eager"] == pytest.approx(6.0)  # within its own thread count
    assert d2["check"]["status"] == "ok"
    table = report.format_table(rows)
    assert "2t/1t" in table.splitlines()[0] and "2.00x" in table and "20.0%" in table


def test_quick_logit_kd_at_two_thread_counts(tmp_path, capsys):
    path = tmp_path / "out.json"
    # In this process: isolated runs at a thread count are covered by the ceilings test above (a fresh
    # process per case x impl x thread count took 38 s of CI here).
    rc = bench.main(["--quick", "--cases", "logit_kd", "--impls", "eager,distillx", "--threads", "1,2", "--no-isolate",
                     "--mm-size", "64", "--copy-mb", "2", "--repeats", "1", "--json", str(path), "-q"])
    out = capsys.readouterr().out
    assert rc == 0, out
    with open(path) as f:
        data = json.load(f)
    assert data["config"]["threads"] == [1, 2]
    found = data["environment"]["ceilings"]
    assert [c["threads"] for c in found] == [1, 2]
    for c in found:
        assert c["mm_size"] == 64 and c["copy_mb"] == 2
        for value in (c["mm_gflops"]["float32"], c["copy_gbps"]):
            assert value > 0 and math.isfinite(value)
    rows = {(r["threads"], r["impl"]): r for r in data["results"]}
    assert set(rows) == {(t, i) for t in (1, 2) for i in ("eager", "distillx")}
    for (threads, impl), r in rows.items():
        assert r["floor"]["bound"] == "bytes" and r["floor"]["bytes"] == 3 * 64 * 512 * 4  # logit_kd: no GEMM
        assert r["floor_ms"] > 0 and math.isfinite(r["floor_ms"])
        assert r["floor_fraction"] > 0 and math.isfinite(r["floor_fraction"])
        assert (r["thread_speedup"] is not None) == (threads == 2)
    assert rows[(2, "distillx")]["thread_speedup"] > 0

    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("case "))
    for col in ("thr", "floor ms", "bound", "% floor", "x compile", "2t/1t"):
        assert col in header
    assert sum(line.startswith("ceilings (") for line in lines) == 2
    assert any(line.startswith("ceilings (2 threads): torch.mm 64x64") for line in lines)


def test_threads_list_parsing():
    parser = bench.build_parser()
    assert parser.parse_args(["--threads", "3"]).threads == [3]
    assert parser.parse_args(["--threads", "2, 1,2"]).threads == [2, 1]
    assert parser.parse_args([]).threads is None


@pytest.mark.parametrize("value,named", [("0", "'0'"), ("1,x", "'x'"), ("1,,2", "''"), ("-1", "'-1'"),
                                         ("1.5", "'1.5'")])
def test_bad_threads_are_named(value, named, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--threads", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--threads" in err and f"{named} is not a positive integer" in err


@pytest.mark.parametrize("flag", ["--mm-size", "--copy-mb"])
def test_bad_ceiling_sizes_are_named(flag, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main([flag, "0"])
    assert exc.value.code == 2 and flag in capsys.readouterr().err
