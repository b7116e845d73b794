"""python -m ryzen_llm.bench_report on a small synthetic pytest-benchmark JSON built here."""
import json

import pytest

from ryzen_llm.bench_report import main

PNG = b"\x89PNG\r\n\x1a\n"


def bench(test, group, median_s, **extra):
    return {"name": test, "fullname": f"benchmarks/x.py::{test}", "group": group,
            "params": None, "extra_info": extra,
            "stats": {"min": median_s, "max": median_s, "mean": median_s, "median": median_s,
                      "rounds": 3}}


def synthetic() -> dict:
    g = "add_layer_norm fp32 fwd"
    benches = [
        bench("test_add_layer_norm[fused-fp32-fwd]", g, 0.001, impl="fused", mode="fwd"),
        bench("test_add_layer_norm[reference-fp32-fwd]", g, 0.004, impl="reference", mode="fwd"),
        bench("test_add_layer_norm[compile-fp32-fwd]", g, 0.002, impl="compile", mode="fwd"),
        # an op whose fused kernel was skipped (extension missing): no fused row
        bench("test_bias_gelu[reference-bf16-bwd]", "bias_gelu bf16 bwd", 0.003,
              impl="reference"),
        bench("test_bias_gelu[sdpa-bf16-bwd]", "bias_gelu bf16 bwd", 0.0015, impl="sdpa"),
        bench("test_peer_micro_step[eager]", "train micro-step (16 x 128)", 0.8,
              name="eager fp32 (written attention)", kind="peer", ms_per_step=800.0,
              tokens_per_s=2560.0, mfu_vs_matmul_peak=0.7, peak_rss_mb=900.0),
        bench("test_level_micro_step[2]", "train micro-step (16 x 128)", 0.4,
              name="ryzen_llm level 2", kind="candidate", ms_per_step=400.0,
              tokens_per_s=5120.0, mfu_vs_matmul_peak=0.9, fell_back_to_reference=[]),
    ]
    for batch, ours in ((1, 200.0), (4, 600.0)):
        benches.append(bench(f"test_generate_ryzen_llm[{batch}]", f"generate batch {batch}",
                             batch * 16 / ours, scenario="generate", impl="ryzen_llm",
                             batch=batch, tokens_per_s=ours, ms_per_token=1e3 / ours * batch,
                             prompt_tokens=32, new_tokens=16))
    benches.append(bench("test_generate_hf_transformers[1]", "generate batch 1", 0.16,
                         scenario="generate", impl="hf_transformers", batch=1,
                         tokens_per_s=100.0, ms_per_token=10.0))  # batch 4: skipped
    benches.append(bench("test_generate_hf_transformers[hf_transformers_bf16-1]",
                         "generate batch 1", 0.128, scenario="generate",
                         impl="hf_transformers_bf16", batch=1, tokens_per_s=125.0,
                         ms_per_token=8.0))  # the faster HF run: the ratio is to it
    benches.append(bench("test_serve[concurrency 8]", "serve", 5.0, scenario="serve",
                         name="concurrency 8", completed=48, errors={},
                         latency_ms={"p50": 120.0, "p95": 150.5, "p99": 170.25},
                         ttft_ms={"p50": 20.0, "p95": 30.0}, requests_per_s=9.6,
                         tokens_per_s=153.6, cpu_percent=180.0, peak_rss_mb=400.0))
    return {"machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2},
                             "python_version": "3.11"},
            "benchmarks": benches}


def test_report_tables_and_plots(tmp_path, capsys):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(synthetic()))
    lt = tmp_path / "lt-c4.json"
    lt.write_text(json.dumps({"kind": "loadtest", "mode": "closed", "concurrency": 4,
                              "completed": 10, "errors": {"401": 2}, "stream": False,
                              "latency_ms": {"p50": 50.0, "p95": 60.0, "p99": 70.0},
                              "ttft_ms": None, "requests_per_s": 3.0, "tokens_per_s": 48.0}))
    out = tmp_path / "report"
    assert main([str(src), str(lt), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    lines = md.splitlines()
    assert "Machine: Test CPU, 2 logical CPUs" in md
    # ops: reference / fused = 4x, compile / fused = 2x; a missing fused kernel reads so
    assert "| add_layer_norm fp32 fwd | 1.000 | 4.000 | 2.000 | 4.00x | 2.00x | - |" in lines
    assert ("| bias_gelu bf16 bwd | not measured | 3.000 | not measured | not measured "
            "| not measured | sdpa 1.500 |") in lines
    # training: level 2 is 2x the only peer
    assert ("| ryzen_llm level 2 | candidate | 400.0 | 5,120 | 90% | not measured | 2.00x "
            "| not measured |  |") in lines
    assert ("| eager fp32 (written attention) | peer | 800.0 | 2,560 | 70% | not measured | 1.00x "
            "| 900 MB |  |") in lines
    # generation: the ratio is to the faster HF dtype; batch 4's HF peers were not measured,
    # never filled in
    assert "| 1 | 200 | 5.00 | 100 | 125 | 1.60x |" in lines
    assert "| 4 | 600 | 6.67 | not measured | not measured | not measured |" in lines
    # server scenarios from the benchmark JSON and from the loadtest JSON
    assert ("| concurrency 8 | 48 | 0 | 120.0 | 150.5 | 170.2 | 20.0 | 30.0 | 9.60 | 154 "
            "| 180% | 400 MB |") in lines
    assert ("| lt-c4 | 10 | 401: 2 | 50.0 | 60.0 | 70.0 | not measured | not measured | 3.00 "
            "| 48 | not measured | not measured |") in lines
    for png in ("ops_speedup.png", "train_step.png", "generate_throughput.png",
                "serve_latency.png"):
        assert (out / png).read_bytes()[:8] == PNG, png
        assert f"]({png})" in md


def test_missing_sections_read_not_measured(tmp_path):
    src = tmp_path / "empty.json"
    src.write_text(json.dumps({"machine_info": {}, "benchmarks": []}))
    out = tmp_path / "r"
    assert main([str(src), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    for what in ("Op benchmarks", "Training micro-step", "Generation", "Server scenarios"):
        assert f"{what}: not measured." in md
    assert not list(out.glob("*.png"))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope.json"), "--out", str(out)])


def test_generation_weight_formats_beside_bfloat16(tmp_path):
    """int8 / int4 engine rows get a tokens/s column and a ratio to the bfloat16 engine; a
    format benchmarked at one batch only reads "not measured" at the others."""
    data = synthetic()
    data["benchmarks"].append(bench("test_generate_ryzen_llm[int8-1]", "generate batch 1",
                                    16 / 300.0, scenario="generate", impl="ryzen_llm_int8",
                                    batch=1, tokens_per_s=300.0, ms_per_token=1e3 / 300.0,
                                    weights="int8"))
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(data))
    assert main([str(src), "--out", str(tmp_path / "r")]) == 0
    lines = (tmp_path / "r" / "report.md").read_text().splitlines()
    assert ("| batch | ryzen_llm tokens/s | ryzen_llm ms/token | int8 tokens/s | int8 vs bfloat16 "
            "| HF fp32 tokens/s | HF bf16 tokens/s | ryzen_llm vs faster HF |") in lines
    assert "| 1 | 200 | 5.00 | 300 | 1.50x | 100 | 125 | 1.60x |" in lines
    assert ("| 4 | 600 | 6.67 | not measured | not measured | not measured | not measured "
            "| not measured |") in lines
