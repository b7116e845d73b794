"""The int8 KV cache against the float32 one: bytes per cached token, decode time, and what it
costs in quality on a trained model. Baseline and candidate run side by side in this process;
the greedy helper comes from tests/test_kv_cache.py so the test and the benchmark never drift.

- bytes: KVCache.bytes_per_token() at the seed's shape (4 layers, 8 heads of 64): 2 * nh *
  hs * 4 per layer in fp32, 2 * nh * (hs + 4) in int8 (codes + one fp32 scale per vector).
- decode step: one ScaledTransformerModel.forward_with_cache step of the seed-size model
  (level 2, random weights: the time does not depend on them) at batch 1, 8 and 32, every row at
  position 96 of 128, with an fp32 and an int8 cache. The int8 step also quantizes the new keys
  and values (one quantize_kv call per layer).
- decode attention: the causal_attention_decode op alone over a full 128-position cache, batch
  32, with the GB/s of cache it reads (napkin math: memory-bound on the cache, 2 * B * nh * T *
  hs * 4 bytes in fp32, 2 * B * nh * T * (hs + 4) in int8).
- quality: on a trained model, the greedy match rate of int8 vs fp32 cache (32 validation
  prompts of 32 tokens, 32 new tokens; free-running position by position, and teacher-forced:
  the argmax of each step while both read the fp32 run's tokens) and the validation perplexity
  computed through the cached decode path (every token fed as one decode step), fp32 vs int8
  cache, beside the full-forward perplexity. Targets: match >= 95%, perplexity within 1%.
  The model: RYZEN_LLM_KV_CHECKPOINT=<checkpoint folder> (a trainer checkpoint; the validation
  split comes from its config's corpus), else a small model (d_model 256, 4 heads of 64, 2
  layers, context 128, BPE 2048) trained here on the stdlib corpus for RYZEN_LLM_KV_TRAIN_STEPS
  (400) steps of 16 x 128 tokens (about 70 s on 2 idle cores, several minutes on a busy
  machine); extra_info says which.

    PYTHONPATH=. python -m pytest benchmarks/bench_kv_cache.py --benchmark-only -s
"""
from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from ryzen_llm import KernelOptimizer
from ryzen_llm.config import Config, ModelConfig
from ryzen_llm.model import KVCache, ScaledTransformerModel
from ryzen_llm.ops._extension import extension_error, extension_loaded
from tests.test_kv_cache import greedy

DTYPES = {"fp32": torch.float32, "int8": torch.int8}
BATCHES = [1, 8, 32]
POSITION = 96  # cached tokens per row when a decode step is timed
ROUNDS = 30
LEVEL = 2 if extension_loaded() else 0
RESULTS: dict = {}  # read by benchmarks/conftest.py for the summary
SEED = Config().model  # d_model 512, 4 layers, 8 heads of 64, context 128
SMALL = ModelConfig(vocab_size=2048, d_model=256, n_layers=2, n_heads=4, d_ff=1024,
                    max_seq_len=128)
TRAIN_STEPS = int(os.environ.get("RYZEN_LLM_KV_TRAIN_STEPS", 400))

requires_fused = pytest.mark.skipif(
    not extension_loaded(),
    reason=f"FUSED DECODE UNAVAILABLE (ryzen_llm._C not built: {extension_error()}): not timed",
)


# -- speed ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seed_model():
    torch.manual_seed(0)
    model = ScaledTransformerModel(SEED).eval()
    KernelOptimizer(LEVEL).apply(model)
    return model


def filled_cache(model, batch: int, dtype: torch.dtype) -> KVCache:
    cache = KVCache(model.config, batch, dtype=dtype)
    idx = torch.randint(0, model.config.vocab_size, (batch, POSITION),
                        generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model.forward_with_cache(idx, cache)
    return cache


@requires_fused
@pytest.mark.parametrize("cache_dtype", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
def test_decode_step(benchmark, seed_model, batch, cache_dtype):
    cache = filled_cache(seed_model, batch, DTYPES[cache_dtype])
    tokens = torch.randint(0, SEED.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(2))

    def setup():
        cache.lengths.fill_(POSITION)  # every round decodes the same position
        return (), {}

    def step():
        with torch.inference_mode():
            seed_model.forward_with_cache(tokens, cache)

    benchmark.group = f"kv cache decode step batch {batch}"
    benchmark.pedantic(step, setup=setup, rounds=ROUNDS, warmup_rounds=3, iterations=1)
    median_ms = benchmark.stats.stats.median * 1e3
    info = {"cache_dtype": cache_dtype, "batch": batch, "position": POSITION,
            "level": LEVEL, "threads": torch.get_num_threads(), "median_ms": median_ms,
            "kv_bytes_per_token": cache.bytes_per_token(), "kv_cache_mib": cache.nbytes() / 2**20}
    benchmark.extra_info.update(info)
    RESULTS[("decode step", batch, cache_dtype)] = info


@requires_fused
@pytest.mark.parametrize("cache_dtype", list(DTYPES))
def test_decode_attention_op(benchmark, cache_dtype):
    from ryzen_llm.ops.causal_attention import causal_attention_decode
    from ryzen_llm.ops.quantize import quantize_kv

    B, nh, T, hs = 32, SEED.n_heads, SEED.max_seq_len, SEED.head_dim
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, nh, 1, hs, generator=g)
    k, v = torch.randn(B, nh, T, hs, generator=g), torch.randn(B, nh, T, hs, generator=g)
    lengths = torch.full((B,), T)
    if cache_dtype == "int8":
        (k, k_scale), (v, v_scale) = quantize_kv(k), quantize_kv(v)
        args = (q, k, v, lengths, 1 / math.sqrt(hs), k_scale, v_scale)
        cache_bytes = 2 * B * nh * T * (hs + 4)
    else:
        args = (q, k, v, lengths, 1 / math.sqrt(hs))
        cache_bytes = 2 * B * nh * T * hs * 4
    benchmark.group = "kv cache decode attention op"
    benchmark.pedantic(causal_attention_decode, args=args, rounds=ROUNDS * 3, warmup_rounds=5,
                       iterations=1)
    median = benchmark.stats.stats.median
    info = {"cache_dtype": cache_dtype, "shape": f"B={B} nh={nh} T={T} hs={hs}",
            "threads": torch.get_num_threads(), "median_ms": median * 1e3,
            "cache_mib_read": cache_bytes / 2**20, "cache_gb_per_s": cache_bytes / median / 1e9}
    benchmark.extra_info.update(info)
    RESULTS[("attention op", B, cache_dtype)] = info


# -- quality ----------------------------------------------------------------------------------------
def train_small_model(steps: int):
    """SMALL trained on the stdlib corpus (the trainer's data pipeline and TrainStep):
    (model, validation tokens, note)."""
    from ryzen_llm.data import BatchSampler, eval_batches, prepare_data
    from ryzen_llm.train_step import TrainStep, warmup_cosine

    data = prepare_data("stdlib", SMALL.vocab_size, SMALL.max_seq_len, max_bytes=4_000_000,
                        progress=False)
    torch.manual_seed(0)
    model = ScaledTransformerModel(SMALL)
    step = TrainStep(model, level=LEVEL, lr=1e-3, lr_schedule=warmup_cosine(1e-3, 20, steps))
    sampler = BatchSampler(data.train_tokens, 16, SMALL.max_seq_len, seed=0)
    t0 = time.perf_counter()
    for i in range(steps):
        step(*sampler.batch(i))
    val_loss = step.evaluate(eval_batches(data.val_tokens, 16, SMALL.max_seq_len, 4))
    note = (f"small model (d_model 256, 2 layers, 4 heads of 64) trained here for {steps} steps "
            f"of 16 x 128 tokens on stdlib ({time.perf_counter() - t0:.0f} s), val loss "
            f"{val_loss:.3f}")
    return model, data.val_tokens, note


def load_trained(path: str):
    """A trainer checkpoint and the validation split of its config's corpus."""
    from ryzen_llm.checkpoint import load_checkpoint
    from ryzen_llm.config import config_from_dict
    from ryzen_llm.data import prepare_data

    ckpt = load_checkpoint(path)
    config = config_from_dict(ckpt.config)
    model = ScaledTransformerModel(config.model)
    model.load_state_dict(ckpt.model_state)
    d = config.data
    data = prepare_data(d.source, config.model.vocab_size, config.model.max_seq_len, d.cache_dir,
                        d.max_bytes, d.val_fraction, config.training.seed, progress=False)
    return model, data.val_tokens, f"checkpoint {path}"


@pytest.fixture(scope="module")
def trained():
    path = os.environ.get("RYZEN_LLM_KV_CHECKPOINT")
    model, val_tokens, note = load_trained(path) if path else train_small_model(TRAIN_STEPS)
    KernelOptimizer(LEVEL).apply(model)
    return model.eval(), val_tokens, note


def cached_perplexity(model, windows: torch.Tensor, dtype: torch.dtype, rows: int = 32) -> float:
    """exp(mean NLL) over windows (N, L + 1): tokens 0..L-1 fed one decode step at a time
    through a KV cache of dtype, each step's logits scoring the next token."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for chunk in windows.split(rows):
            cache = KVCache(model.config, chunk.shape[0], dtype=dtype)
            for t in range(chunk.shape[1] - 1):
                logits = model.forward_with_cache(chunk[:, t : t + 1], cache)  # (rows, V)
                nll += F.cross_entropy(logits.float(), chunk[:, t + 1], reduction="sum").item()
                count += chunk.shape[0]
    return math.exp(nll / count)


def full_forward_perplexity(model, windows: torch.Tensor) -> float:
    with torch.inference_mode():
        losses = [model.loss(w[:, :-1], w[:, 1:]).item() for w in windows.split(32)]
    return math.exp(sum(losses) / len(losses))


def test_int8_cache_quality(benchmark, trained):
    from ryzen_llm.data import eval_batches

    model, val_tokens, note = trained
    L = model.config.max_seq_len
    batches = eval_batches(val_tokens, 32, L, 4)
    windows = torch.cat([torch.cat([idx, tgt[:, -1:]], dim=1) for idx, tgt in batches])  # (N, L+1)
    prompts = windows[:32, :32]

    def evaluate():
        ref = greedy(model, prompts, 32, torch.float32)
        free = greedy(model, prompts, 32, torch.int8)
        forced = greedy(model, prompts, 32, torch.int8, forced=ref)
        ppl = {name: cached_perplexity(model, windows, dtype) for name, dtype in DTYPES.items()}
        return {
            "match_free_running": (free == ref).float().mean().item(),
            "match_teacher_forced": (forced == ref).float().mean().item(),
            "identical_continuations": int((free == ref).all(dim=1).sum()),
            "prompts": prompts.shape[0],
            "ppl_full_forward": full_forward_perplexity(model, windows),
            "ppl_cached_fp32": ppl["fp32"],
            "ppl_cached_int8": ppl["int8"],
        }

    benchmark.group = "kv cache quality"
    r = benchmark.pedantic(evaluate, rounds=1, iterations=1)
    r["ppl_rel_diff"] = r["ppl_cached_int8"] / r["ppl_cached_fp32"] - 1
    r.update(model=note, level=LEVEL, scored_tokens=windows.shape[0] * L)
    benchmark.extra_info.update(r)
    RESULTS["quality"] = r
    print(f"\n{note}\ngreedy match int8 vs fp32 cache: {r['match_free_running']:.1%} free-running, "
          f"{r['match_teacher_forced']:.1%} teacher-forced, {r['identical_continuations']}/"
          f"{r['prompts']} continuations identical\nperplexity over {r['scored_tokens']} "
          f"tokens: full forward {r['ppl_full_forward']:.4f}, cached fp32 "
          f"{r['ppl_cached_fp32']:.4f}, cached int8 {r['ppl_cached_int8']:.4f} "
          f"({r['ppl_rel_diff']:+.3%})")
    assert r["match_free_running"] >= 0.95, "int8 cache: greedy match below the 95% target"
    assert abs(r["ppl_rel_diff"]) < 0.01, "int8 cache: perplexity off by 1% or more"
