"""Fused causal attention against its plain-PyTorch reference."""
from __future__ import annotations

import math

import pytest
import torch

import ryzen_llm.ops.causal_attention  # noqa: F401  (registers the fake impls opcheck needs)
from ryzen_llm.ops import reference
from tests.ops.conftest import DEVICES, assert_within_pytorch_error, requires_extension

pytestmark = requires_extension

# (B, T, nh, hs), awkward on purpose: T = 1, 97 and 200 (ragged query/key tiles), T = 300 (more
# than one forward key tile, so the online-softmax rescaling runs), head dims 48, 64, 80 and an
# odd 33 (column tails; no bf16 pair products), batch 1 and 3.
SHAPES = [
    (1, 1, 2, 48),
    (3, 97, 2, 80),
    (1, 128, 2, 64),
    (3, 200, 2, 48),
    (1, 97, 3, 64),
    (2, 300, 1, 48),
    (2, 33, 1, 33),
]


def fused(q, k, v, key_padding_mask, scale):
    from ryzen_llm.ops.causal_attention import causal_attention

    return causal_attention(q, k, v, key_padding_mask, scale)


def padding_mask(B, T, seed=0):
    """(B, T) bool, True = real token: left padding of a different length per sequence, so the
    first query rows of a padded sequence see no key at all; the first sequence has none."""
    g = torch.Generator().manual_seed(seed)
    pad = torch.randint(0, max(1, T // 2), (B,), generator=g)
    pad[0] = 0
    if B > 1 and T > 1:
        pad[1] = T - 1  # only the last token is real
    return torch.arange(T)[None, :] >= pad[:, None]


def make_inputs(B, T, nh, hs, dtype, device, seed=0):
    """q, k, v as the model makes them: strided views of one (B, T, 3, nh, hs) projection."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3, nh, hs, generator=g, dtype=torch.float64)
    qkv = qkv.to(device=device, dtype=dtype).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs), not contiguous
    return qkv, (q, k, v)


def run_with_grads(fn, qkv, qkv_views, mask, scale, grad):
    out = fn(*qkv_views, mask, scale)
    out.backward(grad)
    g = qkv.grad.detach().clone()
    qkv.grad = None
    return [out.detach(), g[:, :, 0].transpose(1, 2), g[:, :, 1].transpose(1, 2), g[:, :, 2].transpose(1, 2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_within_pytorch_error(device, with_mask, shape, dtype):
    B, T, nh, hs = shape
    scale = 1.0 / math.sqrt(hs)
    mask = padding_mask(B, T).to(device) if with_mask else None
    qkv64, views64 = make_inputs(B, T, nh, hs, torch.float64, device)
    qkv, views = make_inputs(B, T, nh, hs, dtype, device)
    grad64 = torch.randn(B, nh, T, hs, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad64 = grad64.to(device)
    ref64 = run_with_grads(reference.causal_attention, qkv64, views64, mask, scale, grad64)
    plain = run_with_grads(reference.causal_attention, qkv, views, mask, scale, grad64.to(dtype))
    got = run_with_grads(fused, qkv, views, mask, scale, grad64.to(dtype))
    for name, a, b, c in zip(["out", "grad_q", "grad_k", "grad_v"], got, plain, ref64):
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        assert_within_pytorch_error(f"{name} {dtype} {shape} mask={with_mask}", a, b, c)


def test_head_dim_not_unit_stride_is_accepted():
    """A view whose last dim is not contiguous is copied inside the op; the result is the same."""
    q, k, v = (torch.randn(2, 2, 24, 13).transpose(-1, -2) for _ in range(3))  # (B, nh, 13, 24)
    torch.testing.assert_close(
        fused(q, k, v, None, 0.3), reference.causal_attention(q, k, v, None, 0.3)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows_are_zero(device):
    qkv, (q, k, v) = make_inputs(2, 9, 2, 48, torch.float32, device)
    mask = padding_mask(2, 9).to(device)  # sequence 1: only the last token is real
    out = fused(q, k, v, mask, 0.2)
    assert (out[1, :, :-1] == 0).all()
    out.sum().backward()
    assert torch.isfinite(qkv.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_mask", [False, True])
def test_gradcheck_fp64(with_mask, device):
    qkv, (q, k, v) = make_inputs(2, 6, 1, 8, torch.float64, device)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    mask = padding_mask(2, 6).to(device) if with_mask else None
    assert torch.autograd.gradcheck(lambda q, k, v: fused(q, k, v, mask, 0.4), (q, k, v))


def test_opcheck():
    _, (q, k, v) = make_inputs(2, 11, 2, 16, torch.float32, "cpu")
    mask = padding_mask(2, 11)
    for m in (None, mask):
        torch.library.opcheck(torch.ops.ryzen_llm.causal_attention_forward, (q, k, v, m, 0.25))
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.ryzen_llm.causal_attention_forward(q, k, v, mask, 0.25)
    grad = torch.randn_like(out)
    for op in (torch.ops.ryzen_llm.causal_attention_backward,
               torch.ops.ryzen_llm.causal_attention_backward_packed):
        torch.library.opcheck(op, (grad, q, k, v, out, lse, mask, 0.25))
    apart = torch.ops.ryzen_llm.causal_attention_backward(grad, q, k, v, out, lse, mask, 0.25)
    packed = torch.ops.ryzen_llm.causal_attention_backward_packed(grad, q, k, v, out, lse, mask,
                                                                  0.25)
    for i, g in enumerate(apart):
        assert torch.equal(packed.select(2, i).transpose(1, 2), g)
    k_cache, v_cache = torch.randn(2, 2, 13, 16), torch.randn(2, 2, 13, 16)
    torch.library.opcheck(
        torch.ops.ryzen_llm.causal_attention_decode,
        (q[:, :, :1], k_cache, v_cache, torch.tensor([13, 4]), 0.25),
    )


def test_torch_compile_fullgraph():
    qkv, (q, k, v) = make_inputs(2, 19, 2, 32, torch.float32, "cpu")
    mask = padding_mask(2, 19)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, mask, 0.3)
    out.sum().backward()
    g_compiled, qkv.grad = qkv.grad, None
    expected = fused(q, k, v, mask, 0.3)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(g_compiled, qkv.grad)


def test_bf16_autocast_model_path():
    """Under CPU bf16 autocast the Linear hands over bf16 q/k/v; the op runs in bf16."""
    B, T, nh, hs = 2, 17, 2, 32
    x = torch.randn(B, T, nh * hs)
    lin = torch.nn.Linear(nh * hs, 3 * nh * hs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = lin(x).view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4).unbind(0)
        out = fused(q, k, v, None, 1 / math.sqrt(hs))
        ref = reference.causal_attention(q, k, v, None, 1 / math.sqrt(hs))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_equals_last_row_of_forward(dtype, device):
    B, nh, Tmax, hs = 3, 2, 40, 80
    lengths = torch.tensor([40, 1, 23])
    g = torch.Generator().manual_seed(3)
    # Caches as strided views of (B, Tmax, nh, hs) buffers: read in place.
    k_cache = torch.randn(B, Tmax, nh, hs, generator=g).to(device, dtype).transpose(1, 2)
    v_cache = torch.randn(B, Tmax, nh, hs, generator=g).to(device, dtype).transpose(1, 2)
    q_all = torch.randn(B, nh, Tmax, hs, generator=g).to(device, dtype)
    scale = 1 / math.sqrt(hs)
    from ryzen_llm.ops.causal_attention import causal_attention_decode

    q_new = torch.stack([q_all[b, :, lengths[b] - 1] for b in range(B)])[:, :, None]  # (B, nh, 1, hs)
    got = causal_attention_decode(q_new, k_cache, v_cache, lengths.to(device), scale)
    assert got.shape == (B, nh, 1, hs)
    for b in range(B):
        L = int(lengths[b])
        full = fused(q_all[b : b + 1, :, :L], k_cache[b : b + 1, :, :L], v_cache[b : b + 1, :, :L], None, scale)
        torch.testing.assert_close(got[b, :, 0], full[0, :, -1], atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_zero_length_gives_zeros(device):
    q = torch.randn(1, 2, 1, 32, device=device)
    cache = torch.randn(1, 2, 5, 32, device=device)
    out = torch.ops.ryzen_llm.causal_attention_decode(q, cache, cache, torch.tensor([0], device=device), 0.1)
    assert (out == 0).all()


def _bad_forward_cases():
    q = torch.randn(2, 2, 5, 16)
    m = torch.ones(2, 5, dtype=torch.bool)
    return [
        ((q.int(), q, q, None, 0.1), "q: expected float32, float64 or bfloat16"),
        ((q[0], q[0], q[0], None, 0.1), "q: expected a 4-D tensor"),
        ((q, q.double(), q, None, 0.1), "k: expected dtype"),
        ((q, q, q[:, :, :4], None, 0.1), "v: expected sizes"),
        ((q, q, q, m.int(), 0.1), "key_padding_mask: expected dtype bool"),
        ((q, q, q, m[:, :4], 0.1), "key_padding_mask: expected sizes"),
        ((q[..., :4], q[..., :4], q[..., :4], None, 0.1), r"q: head dim \(size 3\) must be in"),
        ((q, q, q, None, float("nan")), "scale: expected a finite number"),
    ]


@pytest.mark.parametrize("args, message", _bad_forward_cases())
def test_bad_input_raises_named_error(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ryzen_llm.causal_attention_forward(*args)


def test_bad_backward_and_decode_input_raise_named_errors():
    q = torch.randn(2, 2, 5, 16)
    out, lse = torch.ops.ryzen_llm.causal_attention_forward(q, q, q, None, 0.1)
    with pytest.raises(RuntimeError, match="lse: expected sizes"):
        torch.ops.ryzen_llm.causal_attention_backward(out, q, q, q, out, lse[:, :, :4], None, 0.1)
    with pytest.raises(RuntimeError, match="grad_out: expected dtype"):
        torch.ops.ryzen_llm.causal_attention_backward(out.double(), q, q, q, out, lse, None, 0.1)
    cache = torch.randn(2, 2, 7, 16)
    lengths = torch.tensor([7, 3])
    decode = torch.ops.ryzen_llm.causal_attention_decode
    with pytest.raises(RuntimeError, match="cache_lengths: entry 1 is 8"):
        decode(q[:, :, :1], cache, cache, torch.tensor([7, 8]), 0.1)
    with pytest.raises(RuntimeError, match="cache_lengths: expected dtype int64"):
        decode(q[:, :, :1], cache, cache, lengths.int(), 0.1)
    with pytest.raises(RuntimeError, match="q: expected one query per sequence"):
        decode(q, cache, cache, lengths, 0.1)
    with pytest.raises(RuntimeError, match="v_cache: expected sizes"):
        decode(q[:, :, :1], cache, cache[:, :, :6], lengths, 0.1)
    with pytest.raises(RuntimeError, match="k_cache: expected dtype"):
        decode(q[:, :, :1], cache.double(), cache, lengths, 0.1)


# -- decode against an int8 KV cache -------------------------------------------------------------
# (B, nh, Tmax, hs): batch 1 and 3, head dims 48, 64 and 80, cache lengths 1, 97 and 128.
DECODE_INT8_SHAPES = [
    (1, 2, 1, 64),
    (3, 2, 97, 48),
    (3, 3, 128, 80),
    (1, 1, 97, 80),
    (3, 2, 128, 64),
]


def int8_cache(B, nh, Tmax, hs, seed=0, strided=False):
    """int8 codes and scales of random keys and values (reference.quantize_kv), and lengths:
    the full cache, a single key and a ragged one per row. strided: codes and scales as
    transposed views of (B, Tmax, nh, ...) buffers, as a cache laid out by token would be."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        x = torch.randn(B, Tmax, nh, hs, generator=g) * torch.rand(B, Tmax, nh, 1, generator=g) * 3
        codes, scales = reference.quantize_kv(x)  # (B, Tmax, nh, hs), (B, Tmax, nh)
        codes, scales = codes.transpose(1, 2), scales.transpose(1, 2)
        out += [codes, scales] if strided else [codes.contiguous(), scales.contiguous()]
    lengths = torch.tensor([Tmax, 1, max(1, Tmax // 2 + 3)][:B])
    return (*out, lengths)


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("shape", DECODE_INT8_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_int8_cache_matches_reference_within_pytorch_error(dtype, shape, strided):
    """The int8 kernel against reference.causal_attention_decode on the dequantized cache: its
    error against fp64 at most 2x what the plain reference makes in q's dtype."""
    B, nh, Tmax, hs = shape
    k_codes, k_scale, v_codes, v_scale, lengths = int8_cache(*shape, strided=strided)
    q64 = torch.randn(B, nh, 1, hs, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q = q64.to(dtype)
    scale = 1.0 / math.sqrt(hs)
    from ryzen_llm.ops.causal_attention import causal_attention_decode

    got = causal_attention_decode(q, k_codes, v_codes, lengths, scale, k_scale, v_scale)
    plain = reference.causal_attention_decode(q, k_codes, v_codes, lengths, scale, k_scale, v_scale)
    k64 = k_codes.double() * k_scale.double()[..., None]
    v64 = v_codes.double() * v_scale.double()[..., None]
    ref64 = reference.causal_attention_decode(q.double(), k64, v64, lengths, scale)
    assert got.dtype == dtype and got.shape == (B, nh, 1, hs)
    assert_within_pytorch_error(f"decode int8 cache, q {dtype} {shape}", got, plain, ref64)


def test_decode_int8_cache_ignores_positions_past_length_and_zero_length():
    k_codes, k_scale, v_codes, v_scale, lengths = int8_cache(3, 2, 40, 48)
    q = torch.randn(3, 2, 1, 48)
    decode = torch.ops.ryzen_llm.causal_attention_decode
    out = decode(q, k_codes, v_codes, lengths, 0.2, k_scale, v_scale)
    L = int(lengths[2])
    k2, v2, ks2, vs2 = k_codes.clone(), v_codes.clone(), k_scale.clone(), v_scale.clone()
    k2[2, :, L:], v2[2, :, L:] = 127, -127
    ks2[2, :, L:], vs2[2, :, L:] = float("nan"), float("inf")
    assert torch.equal(decode(q, k2, v2, lengths, 0.2, ks2, vs2), out)
    zero = decode(q, k_codes, v_codes, torch.tensor([0, 1, 5]), 0.2, k_scale, v_scale)
    assert (zero[0] == 0).all()


def test_decode_int8_cache_nan_vector_gives_nan_like_the_reference():
    """A cached vector that held NaN has scale NaN (quantize_blockwise's rule): the row's output
    is NaN in the kernel and the reference alike, never a silently finite value."""
    x = torch.randn(1, 1, 6, 16)
    x[0, 0, 2, 5] = float("nan")
    codes, scales = reference.quantize_kv(x)
    assert torch.isnan(scales[0, 0, 2]) and (codes[0, 0, 2] == 0).all()
    q = torch.randn(1, 1, 1, 16)
    lengths = torch.tensor([6])
    got = torch.ops.ryzen_llm.causal_attention_decode(q, codes, codes, lengths, 0.3, scales, scales)
    ref = reference.causal_attention_decode(q, codes, codes, lengths, 0.3, scales, scales)
    assert torch.isnan(got).all() and torch.isnan(ref).all()


def test_quantize_kv_is_quantize_blockwise_per_vector():
    """The cache's codes are quantize_blockwise with one block per head-dim vector, fused and
    reference bit for bit, |x - codes * scale| <= scale / 2."""
    from ryzen_llm.ops.quantize import quantize_kv

    x = torch.randn(2, 5, 2, 3, 80)[:, :, 1:]  # a strided view, as the model's qkv slice is
    x[0, 0, 0, 1, 7] = float("inf")
    codes, scales = quantize_kv(x)
    ref_codes, ref_scales = reference.quantize_kv(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scales.shape == x.shape[:-1]
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(scales, ref_scales, rtol=0, atol=0, equal_nan=True)
    data, block_scales = reference.quantize_blockwise(x, 80, 8, False, 0, 0)
    assert torch.equal(data.view(torch.int8), codes.reshape(-1))
    finite = torch.isfinite(scales)
    assert not finite[0, 0, 0, 1] and int(finite.sum()) == finite.numel() - 1
    err = (reference.dequantize_kv(codes, scales) - x).abs()[finite]
    assert (err <= scales[finite][..., None].expand_as(x[finite]) / 2 + 1e-6).all()


def _bad_int8_decode_cases():
    q = torch.randn(2, 2, 1, 16)
    codes = torch.zeros(2, 2, 7, 16, dtype=torch.int8)
    s = torch.ones(2, 2, 7)
    f = torch.randn(2, 2, 7, 16)
    return [
        ((q, codes, codes, None, None), "k_scale: required with an int8 cache"),
        ((q, codes, codes, s, None), "v_scale: required with an int8 cache"),
        ((q, f, f, s, s), "k_scale: given with a Float cache"),
        ((q, codes, f, s, s), "v_cache: expected dtype Char"),
        ((q, codes, codes, s.double(), s), "k_scale: expected dtype float32"),
        ((q, codes, codes, s, s[:, :, :6]), r"v_scale: expected sizes \[2, 2, 7\]"),
        ((q, codes.short(), codes.short(), s, s), "k_cache: expected dtype Float .* or int8"),
    ]


@pytest.mark.parametrize("args, message", _bad_int8_decode_cases())
def test_bad_int8_decode_input_raises_named_error(args, message):
    q, k, v, ks, vs = args
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ryzen_llm.causal_attention_decode(q, k, v, torch.tensor([7, 3]), 0.1, ks, vs)


@pytest.mark.skipif("cuda" not in DEVICES, reason="no CUDA device")
def test_decode_int8_cache_on_cuda_is_refused_by_name():
    k_codes, k_scale, v_codes, v_scale, lengths = (t.cuda() for t in int8_cache(3, 2, 9, 16))
    q = torch.randn(3, 2, 1, 16, device="cuda")
    with pytest.raises(RuntimeError, match="k_cache: int8 KV caches .* CPU kernel only"):
        torch.ops.ryzen_llm.causal_attention_decode(q, k_codes, v_codes, lengths, 0.1, k_scale,
                                                    v_scale)


def test_decode_int8_opcheck_and_compile():
    k_codes, k_scale, v_codes, v_scale, lengths = int8_cache(3, 2, 13, 16)
    q = torch.randn(3, 2, 1, 16)
    args = (q, k_codes, v_codes, lengths, 0.25, k_scale, v_scale)
    torch.library.opcheck(torch.ops.ryzen_llm.causal_attention_decode, args)
    from ryzen_llm.ops.causal_attention import causal_attention_decode

    compiled = torch.compile(causal_attention_decode, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), causal_attention_decode(*args), rtol=0, atol=0)


def test_split_heads_is_the_plain_views_with_one_backward_pass():
    """The fused levels' split of qkv: the same views (values and strides) as the plain split and
    transposes, the same gradient, also when only some of q, k, v are used."""
    from ryzen_llm.ops.causal_attention import split_heads
    from ryzen_llm.ops.dispatch import KernelSet

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 7, 3 * 20, generator=g).bfloat16().requires_grad_()
    fused, plain = split_heads(qkv, 5), KernelSet(0).split_heads(qkv, 5)
    for a, b in zip(fused, plain):
        assert torch.equal(a, b) and a.stride() == b.stride() and a.shape == (2, 5, 7, 4)
    grads = [torch.randn(2, 5, 7, 4, generator=g).bfloat16() for _ in range(3)]
    assert torch.equal(torch.autograd.grad(fused, qkv, grads)[0],
                       torch.autograd.grad(plain, qkv, grads)[0])
    only_k = [torch.autograd.grad(split(qkv, 5)[1].float().square().sum(), qkv)[0]
              for split in (split_heads, KernelSet(0).split_heads)]
    assert torch.equal(*only_k)
    compiled = torch.compile(lambda t: sum(x.sum() for x in split_heads(t, 5)), fullgraph=True,
                             backend="aot_eager")
    assert torch.equal(compiled(qkv), sum(x.sum() for x in plain))


def test_cpu_layouts_make_the_heads_merge_and_the_qkv_gradient_free():
    """On the CPU the output comes laid out as (B, T, H, D), so merging the heads is a view, and
    the three gradients as views of one (B, T, 3, H, D) tensor, which split_heads hands back as
    qkv's gradient without a copy; the same values as through the plain split's views."""
    from ryzen_llm.ops.causal_attention import causal_attention, split_heads
    from ryzen_llm.ops.dispatch import KernelSet

    g = torch.Generator().manual_seed(1)
    B, T, H, D = 2, 9, 3, 16
    qkv = torch.randn(B, T, 3 * H * D, generator=g).requires_grad_()
    grad = torch.randn(B, T, H * D, generator=g)
    results = []
    for split in (split_heads, KernelSet(0).split_heads):
        with torch.profiler.profile() as prof:
            y = causal_attention(*split(qkv, H), None, D**-0.5)
            merged = y.transpose(1, 2).reshape(B, T, H * D)
            (gqkv,) = torch.autograd.grad(merged, qkv, grad)
        copies = {e.name for e in prof.events()} & {"aten::cat", "aten::copy_", "aten::clone"}
        results.append((merged, gqkv, y.data_ptr(), copies))
    (merged, gqkv, y_ptr, copies), (merged_ref, gqkv_ref, _, copies_ref) = results
    assert merged.data_ptr() == y_ptr  # a view
    assert gqkv.is_contiguous()
    assert not copies and copies_ref  # the plain views' backward copies; these do not
    assert torch.equal(merged, merged_ref) and torch.equal(gqkv, gqkv_ref)
