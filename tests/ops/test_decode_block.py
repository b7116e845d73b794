"""decode_block (one transformer block of a decode step as one op) against the composed decode
path it replaces: bit for bit, with float32 and int8 caches, float32 and bfloat16 weights, on
awkward shapes; opcheck; named errors."""
from __future__ import annotations

import pytest
import torch

import ryzen_llm.ops.decode_block  # noqa: F401  (registers the fake kernel)
from ryzen_llm import KernelOptimizer
from ryzen_llm.config import ModelConfig
from ryzen_llm.model import KVCache, ScaledTransformerModel
from tests.ops.conftest import requires_extension

pytestmark = requires_extension

# head dims 40 (portable attention) and 64 (AVX-512 attention), an odd vocabulary and FFN
SHAPES = [
    ModelConfig(vocab_size=301, d_model=80, n_layers=2, n_heads=2, d_ff=96, max_seq_len=97),
    ModelConfig(vocab_size=64, d_model=128, n_layers=2, n_heads=2, d_ff=200, max_seq_len=40),
]


def _model(config, weights):
    torch.manual_seed(0)
    model = ScaledTransformerModel(config).eval()
    KernelOptimizer(2).apply(model)
    return model.cast_linear_weights(weights)


def _decode(model, cache_dtype, one_op, monkeypatch):
    """Prefill 3 ragged prompts, then 5 decode steps; every logit and the whole cache after."""
    monkeypatch.setattr(type(model.kernels), "fused_decode_block",
                        property(lambda self: one_op))
    g = torch.Generator().manual_seed(1)
    B, T = 3, 7
    cache = KVCache(model.config, B, dtype=cache_dtype)
    idx = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 1:] = 0
    mask[2, 4:] = 0
    with torch.inference_mode():
        logits = [model.forward_with_cache(idx, cache, mask)]
        for _ in range(5):
            step = torch.randint(0, model.config.vocab_size, (B, 1), generator=g)
            logits.append(model.forward_with_cache(step, cache))
    return logits, cache._tensors() + [cache.lengths]


@pytest.mark.parametrize("config", SHAPES, ids=["hs40", "hs64"])
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8])
def test_bit_for_bit_the_composed_decode_path(config, weights, cache_dtype, monkeypatch):
    model = _model(config, weights)
    one_op, cache_one = _decode(model, cache_dtype, True, monkeypatch)
    composed, cache_composed = _decode(model, cache_dtype, False, monkeypatch)
    for i, (a, b) in enumerate(zip(one_op, composed)):
        assert torch.equal(a, b), f"logits of call {i}"
    for i, (a, b) in enumerate(zip(cache_one, cache_composed)):
        assert torch.equal(a, b), f"cache tensor {i}"


def test_counts_the_ops_it_runs():
    model = _model(SHAPES[0], torch.float32)
    assert model.kernels.fused_decode_block
    cache = KVCache(model.config, 2)
    with torch.inference_mode():
        model.forward_with_cache(torch.randint(0, 301, (2, 4)), cache)
        before = dict(model.kernels.calls)
        model.forward_with_cache(torch.randint(0, 301, (2, 1)), cache)
    calls = model.kernels.calls
    grew = {k: calls[k] - before.get(k, 0) for k in calls if calls[k] != before.get(k, 0)}
    # 2 blocks: one decode_block each, 4 linears inside each plus the LM head
    assert grew[("decode_block", "fused")] == 2
    assert grew[("decode_linear", "fused")] == 2 * 4 + 1
    assert grew[("causal_attention_decode", "fused")] == 2


def test_a_forced_reference_op_keeps_the_composed_path():
    ks = KernelOptimizer(2, overrides={"causal_attention_decode": "reference"}).kernels
    assert not ks.fused_decode_block
    assert KernelOptimizer(2).kernels.fused_decode_block
    assert not KernelOptimizer(1).kernels.fused_decode_block


def _args(B=2, C=64, H=2, Tmax=9, cache_dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    D = C // H
    caches = [torch.zeros(B, H, Tmax, D, dtype=cache_dtype) for _ in range(2)]
    scales = [torch.zeros(B, H, Tmax) for _ in range(2)] if cache_dtype == torch.int8 else [None, None]
    lengths = torch.tensor([3, 1] * B)[:B]
    slots = (torch.arange(B * H).view(B, H) * Tmax + (lengths - 1)[:, None]).reshape(-1)
    return [r(B, C), r(B, C), r(3 * C, C), r(3 * C), r(C, C), r(C), r(C), r(C), 1e-5,
            r(48, C), r(48), r(C, 48), r(C), r(C), r(C), 1e-5, *caches, *scales, slots, lengths, H]


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8])
def test_opcheck(cache_dtype):
    torch.library.opcheck(torch.ops.ryzen_llm.decode_block, _args(cache_dtype=cache_dtype),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__setitem__(0, a[0].double()), "x: expected float32"),
        (lambda a: a.__setitem__(1, a[1][:1]), "h: expected the sizes of x"),
        (lambda a: a.__setitem__(22, 3), "n_heads: expected a positive divisor"),
        (lambda a: a.__setitem__(20, a[20][:1]), "slots: expected 4 int64"),
        (lambda a: a[20].fill_(10**6), "slots: entry 0 is 1000000, outside the cache"),
        (lambda a: a.__setitem__(17, a[17][:, :, :4]), "v_cache: expected a contiguous tensor like"),
        (lambda a: a.__setitem__(18, torch.zeros(2, 2, 9)), "only an int8 cache takes scales"),
    ],
)
def test_bad_input_raises_named_error(change, message):
    args = _args()
    change(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ryzen_llm.decode_block(*args)


def test_out_of_range_slot_writes_nothing():
    args = _args()
    args[20][-1] = -1  # the last of the step's slots
    k_before, v_before = args[16].clone(), args[17].clone()
    with pytest.raises(RuntimeError, match="slots: entry 3 is -1, outside the cache"):
        torch.ops.ryzen_llm.decode_block(*args)
    assert torch.equal(args[16], k_before) and torch.equal(args[17], v_before)


def test_int8_cache_without_scales_raises_named_error():
    args = _args(cache_dtype=torch.int8)
    args[18] = None
    with pytest.raises(RuntimeError, match="k_scale, v_scale: required with an int8 cache"):
        torch.ops.ryzen_llm.decode_block(*args)


def test_recasting_the_weights_reaches_the_op(monkeypatch):
    """The op's arguments kept on each block follow cast_linear_weights."""
    recast = _model(SHAPES[1], torch.bfloat16)
    _decode(recast, torch.float32, True, monkeypatch)  # keeps the bf16 arguments on the blocks
    recast.cast_linear_weights(torch.float32)
    fresh = _model(SHAPES[1], torch.bfloat16).cast_linear_weights(torch.float32)
    got, _ = _decode(recast, torch.float32, True, monkeypatch)
    want, _ = _decode(fresh, torch.float32, True, monkeypatch)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _step_args(cache_dtype=torch.float32, B=2):
    """decode_step's arguments for a SHAPES[0] model with a B-row cache holding 3 keys per row."""
    model = _model(SHAPES[0], torch.float32)
    cache = KVCache(model.config, B + 1, dtype=cache_dtype)  # more rows than the step uses
    cache.lengths.fill_(3)
    blocks, weights, eps = model.blocks, [], []
    for i, b in enumerate(blocks):
        nxt = blocks[i + 1].ln1 if i + 1 < len(blocks) else model.ln_f
        weights += [b.attn.qkv.weight, b.attn.qkv.bias, b.attn.proj.weight, b.attn.proj.bias,
                    b.ln2.weight, b.ln2.bias, b.mlp.fc1.weight, b.mlp.fc1.bias, b.mlp.fc2.weight,
                    b.mlp.fc2.bias, nxt.weight, nxt.bias]
        eps += [b.ln2.eps, nxt.eps]
    q = cache.k_scale is not None
    return [torch.tensor([[5], [7]][:B]), model.tok_emb.weight.detach(), model.pos_emb,
            blocks[0].ln1.weight.detach(), blocks[0].ln1.bias.detach(), 1e-5,
            [w.detach() for w in weights], eps, model.lm_head.weight.detach(), 301, cache.k,
            cache.v, cache.k_scale if q else [], cache.v_scale if q else [], cache.lengths, 2]


def _prefill_args(cache_dtype=torch.float32):
    """prefill_step's arguments: 2 right-padded prompts of 5 and 3 tokens into a 3-row cache."""
    step = _step_args(cache_dtype)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    idx = torch.randint(0, 301, (2, 5), generator=torch.Generator().manual_seed(2))
    return [idx, mask, mask.sum(1), *step[1:]]


# op -> (its arguments for a cache dtype, where lengths stands among them, lengths after the call)
STEP_OPS = {
    "decode_step": (_step_args, 14, [4, 4, 3]),
    "prefill_step": (_prefill_args, 16, [5, 3, 3]),
}


@pytest.mark.parametrize("op", list(STEP_OPS))
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8])
def test_step_ops_opcheck(op, cache_dtype):
    torch.library.opcheck(getattr(torch.ops.ryzen_llm, op), STEP_OPS[op][0](cache_dtype),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("op", list(STEP_OPS))
def test_step_ops_set_the_lengths_of_the_rows_they_ran(op):
    make_args, at, lengths = STEP_OPS[op]
    args = make_args()
    with torch.inference_mode():
        logits = getattr(torch.ops.ryzen_llm, op)(*args)
    assert logits.shape == (2, 301) and logits.dtype == torch.float32
    assert args[at].tolist() == lengths  # the third row, not in the call, keeps its 3


def _raises_named_error(op, change, message):
    args = STEP_OPS[op][0]()
    change(args)
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.ryzen_llm, op)(*args)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__setitem__(0, a[0].view(-1)), r"idx: expected \(batch, 1\) int64"),
        (lambda a: a.__setitem__(6, a[6][:-1]), "block_weights: expected 12 per block"),
        (lambda a: a.__setitem__(7, a[7][:1]), "block_eps: expected 2 per block"),
        (lambda a: a.__setitem__(11, a[11][:1]), "v_caches: expected 2 caches"),
        (lambda a: a.__setitem__(12, [torch.zeros(3, 2, 97)]), "k_scales, v_scales: expected none"),
        (lambda a: a.__setitem__(14, a[14].int()), "lengths: expected an int64 vector"),
        (lambda a: a[14].fill_(97), "idx: a sequence would exceed the cache length 97"),
        (lambda a: a[14].fill_(-1), "lengths: row 0 is -1, expected >= 0"),
    ],
)
def test_decode_step_bad_input_raises_named_error(change, message):
    _raises_named_error("decode_step", change, message)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__setitem__(0, a[0].int()), r"idx: expected \(batch, tokens\) int64"),
        (lambda a: a.__setitem__(1, a[1].long()), "key_padding_mask: expected a bool tensor"),
        (lambda a: a.__setitem__(2, a[2][:1]), "prompt_lengths: expected 2 int64 lengths"),
        (lambda a: a.__setitem__(8, a[8][:-1]), "block_weights: expected 12 per block"),
        (lambda a: (a.__setitem__(0, torch.zeros(2, 98, dtype=torch.long)),
                    a.__setitem__(1, None)), "k_caches: expected .* Tmax >= 98"),
    ],
)
def test_prefill_step_bad_input_raises_named_error(change, message):
    _raises_named_error("prefill_step", change, message)
