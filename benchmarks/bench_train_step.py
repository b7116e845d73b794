"""One training micro-step of the seed's model (batch 16 x 128: forward, backward, clipping,
AdamW) at every optimization level, beside the plain-PyTorch peers of PERFORMANCE.md, all in one
process on the same inputs: eager fp32 with the attention written out (the seed's baseline),
eager fp32 with F.scaled_dot_product_attention, eager bf16 autocast with and without SDPA,
torch.compile fp32 and bf16, and the int8 training a PyTorch user could pick instead of level 4:
torchao's int8 mixed-precision training (`torchao.prototype.quantized_training`, its linear
layers' forward and input-gradient GEMMs in int8) with bf16 autocast, eager and compiled.

Each result records ms/step, tokens/s and model-FLOP utilisation against the matmul peak
measured in the same session (fp32 or bf16; int8 rows also against torch._int_mm's peak); the terminal summary prints the table with each row's speed
relative to the fastest peer. Nothing asserts on time.

Run: pytest benchmarks/bench_train_step.py --benchmark-only
"""
from __future__ import annotations

import contextlib
import time

import pytest
import torch
import torch.nn.functional as F

from ryzen_llm import ModelConfig, ScaledTransformerModel, TrainStep
from ryzen_llm.hardware import has_native_bf16
from ryzen_llm.ops.dispatch import KernelSet

B, T = 16, 128
WARMUP, ROUNDS = 3, 8
PEAK_WARMUP, PEAK_ROUNDS = 5, 7  # calls of each 2048^3 matmul in matmul_peak
RESULTS: dict[str, dict] = {}  # read by benchmarks/conftest.py for the summary table

PEERS = {
    "eager fp32 (written attention)": dict(sdpa=False, bf16=False, compile=False),
    "eager fp32 + SDPA": dict(sdpa=True, bf16=False, compile=False),
    "eager bf16 autocast": dict(sdpa=False, bf16=True, compile=False),
    "eager bf16 autocast + SDPA": dict(sdpa=True, bf16=True, compile=False),
    "torch.compile fp32": dict(sdpa=False, bf16=False, compile=True),
    "torch.compile bf16 autocast": dict(sdpa=False, bf16=True, compile=True),
}


def sdpa_attention(q, k, v, key_padding_mask, scale):
    assert key_padding_mask is None
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def model_flops_per_step(config: ModelConfig, params: int) -> float:
    """6 x params x tokens for the GEMMs, plus attention scores and values (fwd + bwd), with
    params excluding the token embedding (a lookup, not a matmul)."""
    tokens = B * T
    attention = 12 * config.n_layers * T * config.d_model * tokens
    matmul_params = params - config.vocab_size * config.d_model
    return 6 * matmul_params * tokens + attention


@pytest.fixture(scope="session")
def matmul_peak():
    """Measured GFLOP/s of a 2048^3 matmul, fp32 and bf16, and GOP/s of torch._int_mm (int8 x
    int8 -> int32), in this process: the fastest of PEAK_ROUNDS calls after PEAK_WARMUP. (The
    first few _int_mm calls of a process run slower, by up to 4x, while its buffers are first
    faulted in: one warm-up call and a median of 5 read the int8 peak low and the int8 MFU above
    100%.)"""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8)):
        if dtype == torch.int8:
            a = torch.randint(-127, 128, (2048, 2048), dtype=dtype)
            b = torch.randint(-127, 128, (2048, 2048), dtype=dtype)
            mm = torch._int_mm
        else:
            a = torch.randn(2048, 2048, dtype=dtype)
            b = torch.randn(2048, 2048, dtype=dtype)
            mm = torch.matmul
        for _ in range(PEAK_WARMUP):
            mm(a, b)
        times = []
        for _ in range(PEAK_ROUNDS):
            t0 = time.perf_counter()
            mm(a, b)
            times.append(time.perf_counter() - t0)
        out[name] = 2 * 2048**3 / min(times) / 1e9
    RESULTS["_matmul_peak_gflops"] = out
    return out


def batch(config: ModelConfig):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (B, T), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def time_steps(benchmark, step_fn, idx, targets) -> list[float]:
    """WARMUP untimed steps, then ROUNDS timed ones through pytest-benchmark; the step times."""
    benchmark.pedantic(step_fn, args=(idx, targets), rounds=ROUNDS, warmup_rounds=WARMUP,
                       iterations=1)
    return list(benchmark.stats.stats.data)


def plain_step(model, sdpa: bool, bf16: bool, compile: bool):
    """The plain-PyTorch micro-step a user would write: model.loss, backward, clip, AdamW."""
    model.kernels = KernelSet(0)
    if sdpa:
        model.kernels._fn["causal_attention"] = sdpa_attention
    for m in model.modules():
        if hasattr(m, "kernels"):
            m.kernels = model.kernels
    loss_fn = torch.compile(model.loss) if compile else model.loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step(idx, targets):
        with ctx():
            loss = loss_fn(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def record(benchmark, name: str, kind: str, times: list[float], config, params, peak, bf16,
           int8: bool = False):
    median = sorted(times)[len(times) // 2]
    flops = model_flops_per_step(config, params)
    peak_gflops = peak["bf16" if bf16 else "fp32"]
    info = {
        "name": name,
        "kind": kind,
        "ms_per_step": median * 1e3,
        "spread_ms": (max(times) - min(times)) * 1e3,
        "tokens_per_s": B * T / median,
        "gflops": flops / median / 1e9,
        "mfu_vs_matmul_peak": flops / median / 1e9 / peak_gflops,
        "precision": "int8 GEMMs + bf16" if int8 else "bf16" if bf16 else "fp32",
    }
    if int8:  # the same work against the int8 GEMM's peak: what int8 could at best reach
        info["mfu_vs_int8_peak"] = flops / median / 1e9 / peak["int8"]
    RESULTS[name] = info
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("name", list(PEERS))
def test_peer_micro_step(benchmark, name, matmul_peak):
    opts = PEERS[name]
    if opts["bf16"] and not has_native_bf16():
        pytest.skip("no native bf16 on this CPU: the bf16 peers would not be a fair comparison")
    benchmark.group = "train micro-step (16 x 128)"
    torch.manual_seed(0)
    config = ModelConfig()
    model = ScaledTransformerModel(config)
    idx, targets = batch(config)
    times = time_steps(benchmark, plain_step(model, **opts), idx, targets)
    record(benchmark, name, "peer", times, config, model.count_parameters(), matmul_peak,
           opts["bf16"])


TORCHAO_PEERS = {"torchao int8 mixed-precision, bf16 autocast": False,
                 "torchao int8 mixed-precision, bf16, torch.compile": True}


@pytest.mark.parametrize("name", list(TORCHAO_PEERS))
def test_torchao_int8_peer(benchmark, name, matmul_peak):
    """torchao's int8 mixed-precision training on the same model: every nn.Linear's weight
    becomes its int8 training subclass (plain PyTorch ops otherwise), under bf16 autocast."""
    benchmark.group = "train micro-step (16 x 128)"
    try:
        from torchao import quantize_
        from torchao.prototype.quantized_training import int8_mixed_precision_training
    except Exception as exc:  # not installed, or not importable beside this torch
        RESULTS[name] = {"name": name, "kind": "peer", "not_measured": f"{type(exc).__name__}: {exc}"}
        pytest.skip(f"torchao not measured: {exc}")
    torch.manual_seed(0)
    config = ModelConfig()
    model = ScaledTransformerModel(config)
    quantize_(model, int8_mixed_precision_training())  # before the optimizer sees the weights
    step_fn = plain_step(model, sdpa=False, bf16=True, compile=TORCHAO_PEERS[name])
    idx, targets = batch(config)
    times = time_steps(benchmark, step_fn, idx, targets)
    record(benchmark, name, "peer", times, config, model.count_parameters(), matmul_peak, True,
           int8=True)


@pytest.mark.parametrize("level, compression", [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0), (3, 0.3),
                                                (4, 0.0), (4, 0.3)])
def test_level_micro_step(benchmark, level, compression, matmul_peak):
    """Level 3 and 4 with and without activation compression (the trainer's levels 3 and 4
    compress at optimization.compression_ratio, 0.3 by default)."""
    benchmark.group = "train micro-step (16 x 128)"
    torch.manual_seed(0)
    config = ModelConfig()
    model = ScaledTransformerModel(config)
    step = TrainStep(model, level=level, lr=1e-4, weight_decay=0.01, max_grad_norm=1.0,
                     compression_ratio=compression)
    idx, targets = batch(config)
    times = time_steps(benchmark, step, idx, targets)
    fell_back = [op for op, c in step.kernels.choices.items() if c.reason.startswith("FELL BACK")]
    name = f"ryzen_llm level {level}" + (", int8 GEMMs" if level >= 4 else "") + (
        ", bf16" if step.bf16 else "")
    if compression:
        name += ", int8 activations"
    record(benchmark, name, "candidate", times, config, model.count_parameters(), matmul_peak,
           step.bf16, int8=level >= 4)
    RESULTS[name]["fell_back_to_reference"] = fell_back
    benchmark.extra_info["fell_back_to_reference"] = fell_back
    benchmark.extra_info["ops"] = {op: c.impl for op, c in step.kernels.choices.items()}
