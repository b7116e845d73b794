"""The KV-cache path of the model and the continuous-batching Engine."""
import os
import threading
import time

import pytest
import torch

from ryzen_llm import Engine
from ryzen_llm import engine as engine_module
from ryzen_llm.checkpoint import CheckpointError, save_checkpoint
from ryzen_llm.config import ModelConfig
from ryzen_llm.engine import QueueFull, RequestCancelled, SamplingParams, decode_rows
from ryzen_llm.model import KVCache, ScaledTransformerModel
from ryzen_llm.ops import reference
from ryzen_llm.ops.dispatch import LEVEL_OF_OP, KernelSet
from tests.serve_fixtures import PROMPTS, make_checkpoint

ODD = ModelConfig(vocab_size=301, d_model=80, n_layers=2, n_heads=2, d_ff=96, max_seq_len=97)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def engine(ckpt):
    e = Engine.from_checkpoint(ckpt)
    assert e.wait_ready(30)
    yield e
    e.stop()


def _engine_with_weights(ckpt, weights):
    e = Engine.from_checkpoint(ckpt, weights=weights)
    assert e.wait_ready(30)
    return e


@pytest.fixture(scope="module")
def engine_weights_int8(ckpt):
    """The same checkpoint served from int8 linear weights."""
    e = _engine_with_weights(ckpt, "int8")
    yield e
    e.stop()


@pytest.fixture(scope="module")
def engine_weights_int4(ckpt):
    """The same checkpoint served from int4 linear weights."""
    e = _engine_with_weights(ckpt, "int4")
    yield e
    e.stop()


@pytest.fixture(scope="module")
def engine_int8(ckpt):
    """The same checkpoint served from an int8 KV cache."""
    e = Engine.from_checkpoint(ckpt, kv_cache_dtype="int8")
    assert e.wait_ready(30)
    yield e
    e.stop()


# -- model: the cached path against the plain forward ------------------------------------------
@pytest.mark.parametrize("level", [0, 2, 3])
def test_prefill_then_decode_matches_full_forward(level):
    torch.manual_seed(0)
    model = ScaledTransformerModel(ODD).eval()
    from ryzen_llm import KernelOptimizer

    KernelOptimizer(level).apply(model)
    idx = torch.randint(0, ODD.vocab_size, (1, 60))
    if level == 3:  # generation reads bfloat16 weights: compare with the same rounded weights
        model.cast_linear_weights(torch.bfloat16).cast_linear_weights(torch.float32)
    with torch.inference_mode():
        full = model(idx)[0]  # (T, V)
        if level == 3:
            model.cast_linear_weights(torch.bfloat16)
            assert model.lm_head.weight.dtype == torch.bfloat16
        cache = KVCache(ODD, 1)
        got = [model.forward_with_cache(idx[:, :23], cache)[0]]
        for t in range(23, 60):
            got.append(model.forward_with_cache(idx[:, t : t + 1], cache)[0])
    got = torch.stack(got[:-1])
    err = (got - full[22:59]).abs().max().item()
    print(f"cached vs full forward: max abs error {err:.2e}")
    # Level 3 rounds the activations entering its bfloat16 weights to bfloat16 (decode_linear).
    tol = 3e-2 if level == 3 else 1e-4
    torch.testing.assert_close(got, full[22:59], atol=tol, rtol=tol)
    assert int(cache.lengths[0]) == 60


def test_ragged_right_padded_prefill_matches_each_prompt_alone():
    torch.manual_seed(1)
    model = ScaledTransformerModel(ODD).eval()
    lens = [5, 31, 1, 17]
    prompts = [torch.randint(0, ODD.vocab_size, (n,)) for n in lens]
    T = max(lens)
    idx = torch.zeros(len(lens), T, dtype=torch.long)
    mask = torch.zeros(len(lens), T)
    for i, p in enumerate(prompts):
        idx[i, : len(p)], mask[i, : len(p)] = p, 1
    with torch.inference_mode():
        cache = KVCache(ODD, 4)
        batched = model.forward_with_cache(idx, cache, mask)
        for i, p in enumerate(prompts):
            alone = model.forward_with_cache(p[None], KVCache(ODD, 1))[0] if len(p) > 1 else \
                model(p[None])[0, -1]
            torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=1e-4)
        assert cache.lengths.tolist() == lens
        # one decode step of the batch continues each prompt at its own position
        nxt = torch.randint(0, ODD.vocab_size, (4, 1))
        step = model.forward_with_cache(nxt, cache)
        for i, p in enumerate(prompts):
            ref = model(torch.cat([p, nxt[i]])[None])[0, -1]
            torch.testing.assert_close(step[i], ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="attention_mask"):
        bad = mask.clone()
        bad[0, 0] = 0  # left padding is not what the cache layout expects
        model.forward_with_cache(idx, KVCache(ODD, 4), bad)


@pytest.mark.parametrize("level, kv, weights", [
    (2, "float32", None), (3, "float32", None), (3, "int8", None), (2, "float32", "int4"),
    (3, "float32", "int8"), (3, "int8", "int4")])
def test_padded_prefill_is_bitwise_each_prompt_alone(level, kv, weights):
    """What lets the engine prefill prompts admitted together as one batch (levels 2-3): each
    row's logits and cached keys/values are the bits the prompt gets alone."""
    from ryzen_llm import KernelOptimizer

    torch.manual_seed(2)
    model = ScaledTransformerModel(ODD).eval()
    KernelOptimizer(level).apply(model)
    model.cast_linear_weights(weights or (torch.bfloat16 if level == 3 else torch.float32))
    dtype = getattr(torch, kv)
    lens = [5, 31, 2, 17, 64]  # (a one-token prompt is prefilled alone, on the decode path)
    prompts = [torch.randint(0, ODD.vocab_size, (n,)) for n in lens]
    idx = torch.zeros(len(lens), max(lens), dtype=torch.long)
    mask = torch.zeros_like(idx)
    for i, p in enumerate(prompts):
        idx[i, : len(p)], mask[i, : len(p)] = p, 1
    with torch.inference_mode():
        cache = KVCache(ODD, len(lens), dtype=dtype)
        batched = model.forward_with_cache(idx, cache, mask)
        for i, p in enumerate(prompts):
            own = KVCache(ODD, 1, dtype=dtype)
            alone = model.forward_with_cache(p[None], own)[0]
            assert torch.equal(batched[i], alone), f"prompt {i} (length {len(p)}): logits differ"
            for layer in range(ODD.n_layers):
                assert torch.equal(cache.k[layer][i, :, : len(p)], own.k[layer][0, :, : len(p)])
                assert torch.equal(cache.v[layer][i, :, : len(p)], own.v[layer][0, :, : len(p)])


def test_causal_attention_decode_reference_ignores_keys_past_length():
    torch.manual_seed(2)
    B, nh, Tmax, hs = 3, 2, 13, 48
    q = torch.randn(B, nh, 1, hs)
    k, v = torch.randn(B, nh, Tmax, hs), torch.randn(B, nh, Tmax, hs)
    lengths = torch.tensor([1, 7, 13])
    out = reference.causal_attention_decode(q, k, v, lengths, 0.3)
    for b, n in enumerate(lengths.tolist()):
        att = torch.softmax((q[b] @ k[b, :, :n].transpose(-2, -1)) * 0.3, -1)
        torch.testing.assert_close(out[b], att @ v[b, :, :n])
    k2 = k.clone()
    k2[0, :, 1:] = float("nan")  # garbage past the length must not leak in
    v2 = v.clone()
    v2[0, :, 1:] = 1e30
    torch.testing.assert_close(reference.causal_attention_decode(q, k2, v2, lengths, 0.3)[0], out[0])
    assert LEVEL_OF_OP["causal_attention_decode"] == 2
    ks = KernelSet(0)
    ks.causal_attention_decode(q, k, v, lengths, 0.3)
    assert ks.calls[("causal_attention_decode", "reference")] == 1


@pytest.mark.parametrize("level, weights", [(0, None), (2, None), (3, None), (2, "int4"),
                                            (3, "int8"), (3, "int4")])
@pytest.mark.parametrize("config", [ODD, ModelConfig(vocab_size=320, d_model=64, n_layers=2,
                                                    n_heads=4, d_ff=128, max_seq_len=64)])
def test_decode_rows_are_bitwise_independent_of_the_batch(config, level, weights):
    """The premise of exact batching: each row's logits are the same bits for every batch size
    n: at levels 0-1 at decode_rows(n) rows (the BLAS's kernel choice by M does not leak into a
    row); at levels 2-3 (fused decode_linear, bfloat16 weights at 3) at exactly n rows."""
    torch.manual_seed(4)
    model = ScaledTransformerModel(config).eval()
    from ryzen_llm import KernelOptimizer

    KernelOptimizer(level).apply(model)
    model.cast_linear_weights(weights or (torch.bfloat16 if level == 3 else torch.float32))
    padded = not model.kernels.batch_invariant_decode
    assert padded == (level < 2)
    N = 14
    with torch.inference_mode():
        filled = KVCache(config, N)
        for i in range(N):
            model.forward_with_cache(torch.randint(0, config.vocab_size, (1, 2 + 3 * i)),
                                     filled.rows(i, i + 1))
        tok = torch.randint(0, config.vocab_size, (N, 1))

        def step(rows):
            n, m = len(rows), decode_rows(len(rows), exact=padded)
            cache = KVCache(config, m)
            for layer in range(config.n_layers):
                cache.k[layer][:n], cache.v[layer][:n] = filled.k[layer][rows], filled.v[layer][rows]
            cache.lengths[:n] = filled.lengths[rows]
            t = torch.zeros(m, 1, dtype=torch.long)
            t[:n] = tok[rows]
            return model.forward_with_cache(t, cache)[:n]

        alone = [step([i])[0] for i in range(N)]
        for n in range(2, N + 1):
            out = step(list(range(n)))
            assert all(torch.equal(out[i], alone[i]) for i in range(n)), f"batch {n}"


# -- engine -------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["engine", "engine_int8", "engine_weights_int8",
                                   "engine_weights_int4"])
def test_greedy_alone_equals_batched_bitwise(which, request):
    engine = request.getfixturevalue(which)
    assert engine.cache.quantized == (which == "engine_int8")
    params = SamplingParams(max_new_tokens=24)
    alone = [engine.generate(p, params) for p in PROMPTS]
    batched = engine.generate(PROMPTS, params)
    assert engine.stats["max_batch_seen"] >= len(PROMPTS)
    for a, b in zip(alone, batched):
        assert a["token_ids"] == b["token_ids"]
        assert a["logprobs"] == b["logprobs"]  # exact: the rows do the same arithmetic
        assert a["text"] == b["text"]


def test_requests_join_and_leave_the_running_batch(engine):
    params_long = SamplingParams(max_new_tokens=60)
    ref_long = engine.generate(PROMPTS[3], params_long)
    ref_short = [engine.generate(p, SamplingParams(max_new_tokens=3)) for p in PROMPTS[:4]]
    engine.step_delay_s = 0.002
    try:
        long_req = engine.submit(PROMPTS[3], params_long)
        while len(long_req.candidates[0].tokens) < 10:
            time.sleep(0.001)
        shorts = [engine.submit(p, SamplingParams(max_new_tokens=3)) for p in PROMPTS[:4]]
        short_results = [r.result(30) for r in shorts]
        assert not long_req.future.done()  # the short ones left while the long one runs
        long_result = long_req.result(30)
    finally:
        engine.step_delay_s = 0.0
    assert long_result["token_ids"] == ref_long["token_ids"]
    assert [r["token_ids"] for r in short_results] == [r["token_ids"] for r in ref_short]
    assert all(r.t_done < long_req.t_done for r in shorts)


def test_sampling_seed_topk_topp_and_best_of_n(engine):
    greedy = engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=12))
    top1 = engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1))
    assert top1["token_ids"] == greedy["token_ids"]
    tiny_p = engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=1.0,
                                                          top_p=1e-6, seed=5))
    assert tiny_p["token_ids"] == greedy["token_ids"]
    p = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, n=4)
    a, b = engine.generate(PROMPTS[1], p), engine.generate(PROMPTS[1], p)
    assert a["candidates"] == b["candidates"]  # the seed fixes every draw
    c = engine.generate(PROMPTS[1], SamplingParams(max_new_tokens=12, temperature=1.0, seed=8, n=4))
    assert c["candidates"] != a["candidates"]
    means = [cand["mean_logprob"] for cand in a["candidates"]]
    assert means == sorted(means, reverse=True) and len(means) == 4
    assert a["token_ids"] == a["candidates"][0]["token_ids"]
    assert len({tuple(cand["token_ids"]) for cand in a["candidates"]}) > 1
    for cand in a["candidates"]:
        assert len(cand["logprobs"]) == len(cand["token_ids"]) == 12
        assert all(lp <= 0 for lp in cand["logprobs"])
    # seeded sampling is also unaffected by batching
    together = engine.generate([PROMPTS[1], PROMPTS[2], PROMPTS[5]], p)
    assert together[0]["candidates"] == a["candidates"]
    # ... and by rows moving when a sequence in front of them leaves the batch
    short = engine.submit(PROMPTS[4], SamplingParams(max_new_tokens=2))
    moved = engine.submit(PROMPTS[1], p)
    short.result(30)
    assert moved.result(30)["candidates"] == a["candidates"]


def test_stop_strings_and_max_new_tokens(engine):
    full = engine.generate(PROMPTS[6], SamplingParams(max_new_tokens=30))
    assert len(full["token_ids"]) == 30 and full["finish_reason"] == "length"
    text = full["text"]
    assert text == engine.decode(full["token_ids"])  # decoded once, at the end (no stop strings)
    stop = next((text[i : i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i : i + 2]),
                None)
    if stop is None:
        pytest.skip("generated text has no clean 2-char window")
    cut = engine.generate(PROMPTS[6], SamplingParams(max_new_tokens=30, stop=[stop, "zzzz"]))
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[: text.find(stop)]
    assert stop not in cut["text"]


def test_context_limit_finishes_with_length(engine):
    ids = engine.encode(PROMPTS[6])
    long_prompt = (ids * 20)[: engine.max_len - 3]
    r = engine.generate(long_prompt, SamplingParams(max_new_tokens=50))
    assert r["finish_reason"] == "length"
    assert r["prompt_tokens"] + r["completion_tokens"] == engine.max_len + 1  # last one unfed
    with pytest.raises(ValueError, match="inputs: the prompt is"):
        engine.submit(ids * 100)
    with pytest.raises(ValueError, match="empty"):
        engine.submit("")


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("temperature", -1.0), ("temperature", float("nan")), ("top_k", -2),
    ("top_p", 0.0), ("seed", -1), ("n", 0), ("stop", [""]),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        SamplingParams(**{field: value})


def test_cancel_and_queue_full(ckpt):
    e = Engine.from_checkpoint(ckpt, max_batch_size=2, max_queue=2, warmup_steps=0,
                               step_delay_s=0.01)
    try:
        running = [e.submit(PROMPTS[i], SamplingParams(max_new_tokens=80)) for i in range(2)]
        time.sleep(0.1)
        queued = [e.submit(PROMPTS[i], SamplingParams(max_new_tokens=80)) for i in range(2)]
        with pytest.raises(QueueFull):
            e.submit(PROMPTS[0])
        with pytest.raises(ValueError, match="^n: at most 2"):
            e.submit(PROMPTS[0], SamplingParams(n=3))  # could never be admitted
        for r in running + queued:
            r.cancel()
        for r in running + queued:
            with pytest.raises(RequestCancelled):
                r.result(5)
        assert max(len(r.candidates[0].tokens) for r in running) < 80
        time.sleep(0.05)
        assert e.batch_size == 0 and e.queue_depth == 0
        assert e.generate(PROMPTS[0], SamplingParams(max_new_tokens=2))["completion_tokens"] == 2
    finally:
        e.stop()


def test_prompts_submitted_together_prefill_as_one_batch(ckpt):
    """generate() and submit_many() queue their prompts at once: one prefill for all of them,
    even while a decode step of other work is running."""
    e = Engine.from_checkpoint(ckpt, max_batch_size=8, max_queue=8, warmup_steps=0,
                               step_delay_s=0.002)
    try:
        longer = [p for p in PROMPTS if len(e.encode(p)) > 1]  # one-token ones decode alone
        assert len(longer) >= 4
        for busy in (False, True):  # the scheduler idle (woken by the first prompt) or decoding
            other = e.submit(PROMPTS[5], SamplingParams(max_new_tokens=30)) if busy else None
            while busy and e.batch_size == 0:
                time.sleep(0.001)
            before = dict(e.stats)
            out = e.generate(longer, SamplingParams(max_new_tokens=3))
            assert [r["completion_tokens"] for r in out] == [3] * len(longer)
            assert e.stats["prefills"] - before["prefills"] == len(longer)
            assert e.stats["prefill_batches"] - before["prefill_batches"] == 1, f"busy={busy}"
            if other is not None:
                other.result(30)
        # all or none: a batch that does not fit the queue now is refused whole
        blockers = e.submit_many(PROMPTS[:7], SamplingParams(max_new_tokens=60))
        with pytest.raises(QueueFull):
            e.submit_many(PROMPTS[:3])
        assert e.queue_depth + e.batch_size == 7
        for r in blockers:
            r.cancel()
        with pytest.raises(ValueError, match=r"^prompts: 16 prompts can never fit the request "
                                             r"queue of 8 \(max_queue\)"):
            e.submit_many(PROMPTS * 2)
        with pytest.raises(ValueError, match=r"^prompts\[1\]: the prompt is empty"):
            e.submit_many([PROMPTS[0], ""])
    finally:
        e.stop()


def test_warmup_runs_before_ready(ckpt):
    e = Engine.from_checkpoint(ckpt, warmup_steps=40, start=False)
    assert not e.ready.is_set()
    e._thread.start()
    assert e.wait_ready(30)
    impl = e.model.kernels.choices["causal_attention_decode"].impl
    assert e.model.kernels.calls[("causal_attention_decode", impl)] >= 40 * 2  # 2 layers
    assert int(e.cache.lengths.max()) == 0
    e.stop()


def test_levels_choose_weights_and_padding(ckpt):
    e3 = Engine.from_checkpoint(ckpt, level=3, warmup_steps=0, start=False)
    assert e3.model.lm_head.weight.dtype == torch.bfloat16 and not e3.exact
    assert "bfloat16" in e3.level_note and "batch-invariant" in e3.level_note
    with pytest.raises(RuntimeError, match="cast_linear_weights"):
        e3.model(torch.zeros(1, 4, dtype=torch.long))  # training forward needs float32
    e0 = Engine.from_checkpoint(ckpt, level=0, warmup_steps=0, start=False)
    assert e0.model.lm_head.weight.dtype == torch.float32 and e0.exact
    assert e0.cache.batch == decode_rows(e0.max_batch_size)
    with pytest.raises(ValueError, match="threads"):
        Engine.from_checkpoint(ckpt, threads=0, start=False)

@pytest.mark.parametrize("weights, dtype", [("int8", torch.int8), ("int4", torch.uint8)])
def test_quantized_weights_are_packed_and_named(ckpt, weights, dtype):
    e = Engine.from_checkpoint(ckpt, weights=weights, warmup_steps=0, start=False)
    assert e.weights == weights and f"{weights} linear weights" in e.level_note
    assert e.model.lm_head.decode_weight.dtype == dtype and e.model.lm_head.decode_weight.dim() == 3
    assert e.model.linear_weight_format == weights and not e.exact
    with pytest.raises(RuntimeError, match="cast_linear_weights"):
        e.model(torch.zeros(1, 4, dtype=torch.long))  # training forward needs float32
    # the composed path (no fused decode step) runs the same quantized kernels, bit for bit
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        fused = e.model.forward_with_cache(ids, KVCache(e.model.config, 1))
        e.model.kernels.__dict__["fused_decode_block"] = False  # cached_property: composed path
        composed = e.model.forward_with_cache(ids, KVCache(e.model.config, 1))
    assert torch.equal(fused, composed)


def test_unknown_or_unsupported_weight_format_is_a_named_error(ckpt):
    with pytest.raises(ValueError, match="weights: expected one of float32, bfloat16, int8, int4"):
        Engine.from_checkpoint(ckpt, weights="int3", warmup_steps=0, start=False)
    with pytest.raises(ValueError, match="weights: 'int8' runs on the fused decode_linear only"):
        Engine.from_checkpoint(ckpt, level=1, weights="int8", warmup_steps=0, start=False)
    with pytest.raises(ValueError, match="dtype: expected torch.float32, torch.bfloat16 or one"):
        ScaledTransformerModel(ODD).cast_linear_weights(torch.float16)


def test_kv_cache_dtype_from_config_or_argument(ckpt):
    e = Engine.from_checkpoint(ckpt, warmup_steps=0, start=False)
    assert e.kv_cache_dtype == "float32" and e.cache.k[0].dtype == torch.float32
    e.config.inference.kv_cache_dtype = "int8"
    e = Engine(e.model, e.tokenizer, e.config, warmup_steps=0, start=False)
    assert e.kv_cache_dtype == "int8" and e.cache.quantized
    with pytest.raises(ValueError, match="^kv_cache_dtype: expected float32 or int8, got 'fp8'"):
        Engine(e.model, e.tokenizer, e.config, kv_cache_dtype="fp8", start=False)


def test_weights_from_config_or_argument(ckpt):
    e = Engine.from_checkpoint(ckpt, warmup_steps=0, start=False)
    assert e.config.inference.weights is None and e.weights == "bfloat16"  # level 3's default
    e.config.inference.weights = "int4"
    config = e.config
    e = Engine.from_checkpoint(ckpt, warmup_steps=0, start=False)
    e = Engine(e.model, e.tokenizer, config, warmup_steps=0, start=False)
    assert e.weights == "int4" and e.model.linear_weight_format == "int4"
    e = Engine.from_checkpoint(ckpt, warmup_steps=0, start=False)
    e = Engine(e.model, e.tokenizer, config, weights="int8", warmup_steps=0, start=False)
    assert e.weights == "int8"  # the argument wins


def test_checkpoint_without_tokenizer_is_refused(tmp_path):
    model = ScaledTransformerModel(ODD)
    path = save_checkpoint(tmp_path / "ck", model, {"model": vars(ODD)})
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Engine.from_checkpoint(path)


def test_inexact_mode_decodes_without_dummy_rows(ckpt):
    e = Engine.from_checkpoint(ckpt, level=1, exact=False, warmup_steps=3)
    try:
        assert not e.exact and e.wait_ready(30)
        exact = Engine.from_checkpoint(ckpt, level=1, warmup_steps=0)
        a = e.generate(PROMPTS[2], SamplingParams(max_new_tokens=8))
        b = exact.generate(PROMPTS[2], SamplingParams(max_new_tokens=8))
        exact.stop()
        assert len(a["token_ids"]) == 8
        # same model, other GEMM shapes: log-probs agree to rounding
        n = min(len(a["token_ids"]), len(b["token_ids"]))
        if a["token_ids"][:n] == b["token_ids"][:n]:
            torch.testing.assert_close(a["logprobs"], b["logprobs"], atol=1e-4, rtol=1e-4)
    finally:
        e.stop()


@pytest.mark.skipif(engine_module._omp_pause is None or not os.path.isdir("/proc/self/task"),
                    reason="the OpenMP runtime is not libgomp, or no /proc")
def test_release_idle_openmp_workers_ends_the_calling_threads_workers():
    """A thread that ran a 2-thread parallel region keeps one idle worker; releasing ends it
    (and only it), and the next region starts it again."""
    counts, released = [], []

    def tasks():  # the process's thread ids: other tests' threads may start or end meanwhile
        return set(os.listdir("/proc/self/task"))

    def work():
        torch.set_num_threads(2)
        x = torch.randn(1 << 22)  # ATen runs exp_ on 2 threads (grain 32768)
        counts.append(tasks())
        x.exp_()
        counts.append(tasks())
        released.append(engine_module.release_idle_openmp_workers())
        # libgomp's workers leave the pool before the call returns but exit on their own
        # schedule: wait (bounded) until the new worker has left /proc
        deadline = time.monotonic() + 10
        while (counts[1] - counts[0]) & tasks() and time.monotonic() < deadline:
            time.sleep(0.01)
        counts.append(tasks())
        x.exp_()
        counts.append(tasks())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert released == [True]
    worker = counts[1] - counts[0]
    assert len(worker) == 1  # the region's worker stays, idle
    assert not worker & counts[2]  # ended
    assert len(counts[3] - counts[2]) == 1  # started again by the next region
