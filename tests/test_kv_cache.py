"""The int8 KV cache: layout and bookkeeping of KVCache(dtype=torch.int8), what prefill and decode
write into it, the model's decode through it against the fp32 cache, and the greedy agreement of
the two caches on a trained mini model."""
import pytest
import torch

from ryzen_llm import KernelOptimizer
from ryzen_llm.config import ModelConfig
from ryzen_llm.model import KVCache, ScaledTransformerModel
from ryzen_llm.ops import reference
from ryzen_llm.ops._extension import extension_loaded

SEED_SHAPE = ModelConfig(vocab_size=64, d_model=512, n_layers=4, n_heads=8, d_ff=64, max_seq_len=128)
ODD = ModelConfig(vocab_size=301, d_model=80, n_layers=2, n_heads=2, d_ff=96, max_seq_len=97)
LEVELS = [0, 2] if extension_loaded() else [0]


def test_int8_layout_and_bytes_per_token():
    c = SEED_SHAPE  # head dim 64
    int8, fp32 = KVCache(c, 3, dtype=torch.int8), KVCache(c, 3)
    assert int8.quantized and not fp32.quantized and fp32.k_scale is None
    assert int8.k[0].dtype == torch.int8 and int8.k[0].shape == (3, 8, 128, 64)
    assert int8.k_scale[0].dtype == torch.float32 and int8.v_scale[3].shape == (3, 8, 128)
    assert int8.bytes_per_token() == 2 * c.n_layers * c.n_heads * (64 + 4)
    assert fp32.bytes_per_token() == 2 * c.n_layers * c.n_heads * 64 * 4
    assert int8.nbytes() == 3 * 128 * int8.bytes_per_token()
    assert abs(int8.nbytes() / fp32.nbytes() - 0.266) < 1e-3
    with pytest.raises(ValueError, match="dtype: expected one of"):
        KVCache(c, 1, dtype=torch.int16)


def test_rows_and_copy_row_cover_the_scales():
    cache = KVCache(ODD, 4, dtype=torch.int8)
    for t in (*cache.k, *cache.v):
        t.copy_(torch.randint(-127, 128, t.shape, dtype=torch.int8))
    for t in (*cache.k_scale, *cache.v_scale):
        t.copy_(torch.rand(t.shape))
    cache.lengths[:] = torch.tensor([5, 9, 2, 1])
    view = cache.rows(1, 3)
    assert view.quantized and view.batch == 2 and view.k_scale[1].shape == (2, 2, 97)
    view.k_scale[1][0, 0, 0] = 42.0  # a view: writes land in the cache
    assert cache.k_scale[1][1, 0, 0] == 42.0
    cache.copy_row(1, slice(2, 4))
    for t in cache._tensors():
        assert torch.equal(t[2, :, :9], t[1, :, :9]) and torch.equal(t[3, :, :9], t[1, :, :9])
    assert cache.lengths.tolist() == [5, 9, 9, 9]
    before = [t[0].clone() for t in cache._tensors()]
    cache.copy_row(0, 0)
    assert all(torch.equal(b, t[0]) for b, t in zip(before, cache._tensors()))


def _model(config, level, seed=0):
    torch.manual_seed(seed)
    model = ScaledTransformerModel(config).eval()
    KernelOptimizer(level).apply(model)
    return model


@pytest.mark.parametrize("level", LEVELS)
def test_prefill_attends_exactly_and_writes_quantized_keys_and_values(level):
    """Prefill logits are the same bits with either cache (prompt attention uses the exact
    k/v); the int8 cache then holds quantize_kv of exactly what the fp32 cache holds."""
    model = _model(ODD, level)
    idx = torch.randint(0, ODD.vocab_size, (2, 31))
    mask = torch.ones(2, 31)
    mask[1, 20:] = 0
    with torch.inference_mode():
        fp32, int8 = KVCache(ODD, 2), KVCache(ODD, 2, dtype=torch.int8)
        a = model.forward_with_cache(idx, fp32, mask)
        b = model.forward_with_cache(idx, int8, mask)
    assert torch.equal(a, b)
    assert int8.lengths.tolist() == [31, 20]
    for i in range(ODD.n_layers):
        for codes, scales, exact in ((int8.k[i], int8.k_scale[i], fp32.k[i]),
                                     (int8.v[i], int8.v_scale[i], fp32.v[i])):
            want_codes, want_scales = reference.quantize_kv(exact[:, :, :31])
            assert torch.equal(codes[:, :, :31], want_codes)
            assert torch.equal(scales[:, :, :31], want_scales)


@pytest.mark.parametrize("level", LEVELS)
def test_decode_through_int8_cache_tracks_the_fp32_cache(level):
    """Decode steps: layer 0's new key/value (a function of the token alone) is stored as its
    exact quantize_kv; the logits stay close to the fp32 cache's."""
    model = _model(ODD, level)
    prompt = torch.randint(0, ODD.vocab_size, (3, 17))
    steps = torch.randint(0, ODD.vocab_size, (3, 40))
    with torch.inference_mode():
        fp32, int8 = KVCache(ODD, 3), KVCache(ODD, 3, dtype=torch.int8)
        model.forward_with_cache(prompt, fp32)
        model.forward_with_cache(prompt, int8)
        worst = 0.0
        for t in range(steps.shape[1]):
            a = model.forward_with_cache(steps[:, t : t + 1], fp32)
            b = model.forward_with_cache(steps[:, t : t + 1], int8)
            worst = max(worst, ((a - b).abs().max() / a.abs().max()).item())
        pos = 17 + steps.shape[1] - 1
        codes, scales = reference.quantize_kv(fp32.k[0][:, :, pos])
        assert torch.equal(int8.k[0][:, :, pos], codes)
        assert torch.equal(int8.k_scale[0][:, :, pos], scales)
    print(f"level {level}: int8 vs fp32 cache, worst logit difference {worst:.2e} of max |logit|")
    assert worst < 3e-2
    impl = model.kernels.choices["causal_attention_decode"].impl
    # one call per layer and forward quantizes the new keys and values together
    assert model.kernels.calls[("quantize_kv", impl)] == ODD.n_layers * (1 + steps.shape[1])


@pytest.mark.skipif(not extension_loaded(), reason="the fused kernels are not built")
def test_fused_and_reference_int8_decode_agree():
    """Level 2 (fused quantize and decode kernels) against level 0 (plain PyTorch) on the same
    int8 cache contents."""
    models = [_model(ODD, level) for level in (0, 2)]
    prompt = torch.randint(0, ODD.vocab_size, (2, 9))
    nxt = torch.randint(0, ODD.vocab_size, (2, 6))
    outs = []
    with torch.inference_mode():
        for model in models:
            cache = KVCache(ODD, 2, dtype=torch.int8)
            model.forward_with_cache(prompt, cache)
            outs.append(torch.stack([model.forward_with_cache(nxt[:, t : t + 1], cache)
                                     for t in range(nxt.shape[1])]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)


def greedy(model, prompts: torch.Tensor, new_tokens: int, dtype: torch.dtype,
           forced: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy continuations (B, new_tokens) through a KV cache of dtype; with forced (B, n),
    the argmax at each step while feeding forced instead (teacher forcing)."""
    B = prompts.shape[0]
    cache = KVCache(model.config, B, dtype=dtype)
    out = []
    with torch.inference_mode():
        logits = model.forward_with_cache(prompts, cache)
        for t in range(new_tokens):
            tok = logits.argmax(-1)  # (B,)
            out.append(tok)
            feed = tok if forced is None else forced[:, t]
            if t + 1 < new_tokens:
                logits = model.forward_with_cache(feed[:, None], cache)
    return torch.stack(out, dim=1)


def test_greedy_match_rate_of_int8_cache_on_a_trained_model():
    """The convergence test's mini model after 30 steps: greedy tokens with the int8 cache
    against the fp32 cache, free-running and teacher-forced, >= 95% the same."""
    from tests.test_convergence import MINI, losses

    level = LEVELS[-1]
    _, step = losses(level)
    model = step.model.eval()
    g = torch.Generator().manual_seed(7)
    starts = torch.randint(0, MINI.vocab_size, (12, 1), generator=g)
    prompts = (starts + torch.arange(8)) % MINI.vocab_size  # the counting stream it learned
    ref = greedy(model, prompts, 32, torch.float32)
    free = greedy(model, prompts, 32, torch.int8)
    forced = greedy(model, prompts, 32, torch.int8, forced=ref)
    free_rate = (free == ref).float().mean().item()
    forced_rate = (forced == ref).float().mean().item()
    print(f"level {level}: int8 vs fp32 cache greedy match {free_rate:.1%} free-running, "
          f"{forced_rate:.1%} teacher-forced, over {ref.numel()} tokens")
    assert free_rate >= 0.95 and forced_rate >= 0.95
