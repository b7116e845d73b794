"""The model's linear layers, x @ W.T + b (GELU'd when gelu): nn.Linear's math below level 4,
int8 GEMMs from level 4 (the C++ side is csrc/cpu/linear.cpp, and csrc/cuda/linear.cu).

The level-4 linear quantizes x per row and the weight per output channel for the forward GEMM;
backward reuses those codes: grad_x = (grad_y * w_scales) @ W_codes with grad_y (so scaled)
quantized per row, and (INT8_WEIGHT_GRAD) grad_W = (grad_y * x_scales).T @ x_codes with grad_y
(so scaled) quantized per column. Each int8 x int8 -> int32 sum is exact and is dequantized with
its row's and column's float32 scales, + bias (float32), GELU, in one pass. The weight's codes
are made once per optimizer step: they are cached on the parameter and remade when its version
counter moves (the optimizer updates it in place), so gradient accumulation over micro-batches
quantizes each weight once. Saved for backward: x's row codes (int8, half the bytes of
bfloat16) with its row scales or, without the int8 weight gradient, x itself, and the
pre-activation of a GELU'd layer. On the CPU each GEMM runs through at::_int_mm (oneDNN) or the
library's own AVX512-VNNI kernel (csrc/cpu/int8_gemm.cpp), the faster per shape (the own kernel
when within 15%): both are timed on a shape's first call, and int8_gemm_choices() says which runs
where (the same int32 sums either way). A NaN or inf in a row of x makes that output row NaN and,
through its scale, the whole weight gradient NaN (the trainer stops at a non-finite loss).

The feed-forward, fc2(GELU(fc1(x))), runs as one op of the same math (int8_feed_forward,
csrc/cpu/int8_feed_forward.cpp) whose GEMM epilogues write the next GEMM's int8 operands: fc1's
epilogue quantizes GELU's output for fc2 (the activation is never a bfloat16 tensor), and in
backward the epilogue of grad_h's GEMM applies GELU' and quantizes fc1's gradient per row.

The row codes of x come from x's producer where it writes them: from level 4 add + LayerNorm
writes its output's codes while each row is in cache (ROW_CODES_FROM_LAYER_NORM;
ops.add_layer_norm.add_layer_norm_with_row_codes) and attaches them to the output
(attach_row_codes); qkv, the feed-forward and the LM head take them (given_row_codes) instead
of quantizing x. They are int8_quantize's codes of x bit for bit, so every result is the same.
"""
from __future__ import annotations

import torch

from ryzen_llm.ops import reference
from ryzen_llm.ops._autograd import first_order_only, not_differentiable
from ryzen_llm.ops._extension import extension_loaded, kernel_devices
from ryzen_llm.ops._spec import OpSpec

_LIB = "ryzen_llm"

# The weight gradient's GEMM in int8 (grad_y and x per column) or in the activations' dtype.
INT8_WEIGHT_GRAD = True

# Whether, from level 4, add + LayerNorm writes its output's int8 row codes for the linear that
# reads it (KernelSet.add_layer_norm); False: that linear quantizes the output itself.
ROW_CODES_FROM_LAYER_NORM = True

_CACHE_ATTR = "_ryzen_llm_int8_codes"


# set_int8_gemm's modes, as csrc/cpu/int8_gemm.h numbers them.
INT8_GEMM_MODES = {"auto": 0, "own": 1, "onednn": 2}
_IMPL_NAMES = {1: "own", 2: "onednn"}


def set_int8_gemm(mode: str) -> str:
    """Which int8 GEMM the CPU kernels run, process-wide: "auto" (the faster per shape, timed
    on its first call, the own kernel when within 15%; the default), "own" (the AVX512-VNNI kernel; plain loops without VNNI)
    or "onednn" (at::_int_mm). Returns the previous mode."""
    if mode not in INT8_GEMM_MODES:
        raise ValueError(f"int8 GEMM mode: expected one of {sorted(INT8_GEMM_MODES)}, got {mode!r}")
    old = torch.ops.ryzen_llm.int8_gemm_mode(INT8_GEMM_MODES[mode])
    return {v: k for k, v in INT8_GEMM_MODES.items()}[old]


def int8_gemm_choices() -> list[dict]:
    """Per GEMM shape the CPU kernels met in this process (M, N, K, threads): the implementation
    its last call ran ("own" or "onednn"), the microseconds each took when "auto" timed the
    shape (None: not timed), and the calls counted per implementation."""
    flat = torch.ops.ryzen_llm.int8_gemm_choices()
    out = []
    for i in range(0, len(flat), 9):
        M, N, K, threads, impl, own_us, onednn_us, own_calls, onednn_calls = flat[i:i + 9]
        out.append({"M": M, "N": N, "K": K, "threads": threads, "runs": _IMPL_NAMES[impl],
                    "own_us": own_us or None, "onednn_us": onednn_us or None,
                    "calls": {"own": own_calls, "onednn": onednn_calls}})
    return out


def weight_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of a (N, K) weight per output channel: the forward's and the input
    gradient's. Cached on the weight until it changes (its version counter or storage); remade
    on every call under torch.compile, which cannot guard on the cache."""
    w = weight.detach()
    if torch.compiler.is_compiling():
        return torch.ops.ryzen_llm.int8_quantize(w.float().contiguous(), True, False)[:2]
    key = (w._version, w.data_ptr(), w.shape, w.dtype)
    cached = getattr(weight, _CACHE_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    codes = torch.ops.ryzen_llm.int8_quantize(w.float().contiguous(), True, False)[:2]
    setattr(weight, _CACHE_ATTR, (key, codes))
    return codes


_ROWS_ATTR = "_ryzen_llm_int8_rows"


def attach_row_codes(t: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Keeps the int8 row codes (rows, K) and float32 scales (rows,) of t (..., K), made by the
    kernel that wrote t (add_layer_norm's), with t while t is unchanged (its version counter):
    the level-4 op reading t takes them instead of quantizing t again. Not on an inference
    tensor, which has no version counter."""
    if not t.is_inference():
        setattr(t, _ROWS_ATTR, (t._version, codes, scales))


def given_row_codes(x: torch.Tensor, x2: torch.Tensor) -> tuple:
    """(codes, scales) attached to x, or to the tensor x views whole (a reshape of it), when
    they are the row codes of x2 (x's rows as an op reads them: the same dtype, unchanged since),
    else (None, None). Not while torch.compile traces."""
    if torch.compiler.is_compiling() or x.is_inference():
        return None, None
    src = x
    if not hasattr(src, _ROWS_ATTR) and x._base is not None:
        base = x._base  # the views of it that qualify hold its elements in its order
        if (x.is_contiguous() and base.is_contiguous() and x.data_ptr() == base.data_ptr()
                and x.numel() == base.numel()):
            src = base
    got = getattr(src, _ROWS_ATTR, None)
    if (got is None or got[0] != src._version or x2.dtype != src.dtype
            or got[1].shape != x2.shape):
        return None, None
    return got[1], got[2]


if extension_loaded():

    @torch.library.register_fake(f"{_LIB}::int8_linear_forward")
    def _(x, weight, bias, w_codes, w_scales, gelu, save_codes, x_codes=None, x_scales=None):
        M, K = x.shape
        N = weight.shape[0]
        pre = x.new_empty((M, N) if gelu else (0, 0))
        save = save_codes and x_codes is None
        codes = x.new_empty((M, K) if save else (0, 0), dtype=torch.int8)
        scales = x.new_empty((M if save else 0,), dtype=torch.float32)
        return x.new_empty((M, N)), pre, codes, scales

    @torch.library.register_fake(f"{_LIB}::int8_linear_backward")
    def _(grad_y, pre, x_saved, x_scales, w_codes, w_scales, gelu, need_grad_x, int8_weight_grad):
        M = grad_y.shape[0]
        N, K = w_codes.shape
        return (grad_y.new_empty((M, K) if need_grad_x else (0,)),
                grad_y.new_empty((N, K), dtype=torch.float32),
                grad_y.new_empty((N,), dtype=torch.float32))

    @torch.library.register_fake(f"{_LIB}::int8_quantize")
    def _(x, rows, cols):
        M, K = x.shape
        return (x.new_empty((M, K) if rows else (0, 0), dtype=torch.int8),
                x.new_empty((M if rows else 0,), dtype=torch.float32),
                x.new_empty((M, K) if cols else (0, 0), dtype=torch.int8),
                x.new_empty((K if cols else 0,), dtype=torch.float32))

    @torch.library.register_fake(f"{_LIB}::int8_mm")
    def _(a, b):
        return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int32)

    @torch.library.register_fake(f"{_LIB}::int8_dequantize")
    def _(acc, row_scales, col_scales, bias, gelu, dtype):
        return (acc.new_empty(acc.shape, dtype=dtype),
                acc.new_empty(acc.shape if gelu else (0, 0), dtype=dtype))

    def _setup_context(ctx, inputs, output):
        x, weight, bias, w_codes, w_scales, gelu, int8_weight_grad = inputs[:7]
        _, pre, x_codes, x_scales = output
        if len(inputs) > 7 and inputs[7] is not None:  # the producer's codes, not returned
            x_codes, x_scales = inputs[7:9]
        ctx.set_materialize_grads(False)
        ctx.gelu, ctx.int8_weight_grad = gelu, int8_weight_grad
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        x_saved = x_codes if int8_weight_grad else x
        ctx.save_for_backward(pre, x_saved, x_scales, w_codes, w_scales)

    def _backward(ctx, grad_y, *_unused):
        first_order_only("linear (int8)")
        if grad_y is None:  # only pre / the codes were used: not differentiable here
            return (None,) * 9
        pre, x_saved, x_scales, w_codes, w_scales = ctx.saved_tensors
        grad_x, grad_w, grad_b = torch.ops.ryzen_llm.int8_linear_backward(
            grad_y.contiguous(), pre, x_saved, x_scales, w_codes, w_scales,
            ctx.gelu, ctx.needs_input_grad[0], ctx.int8_weight_grad)
        return (grad_x if ctx.needs_input_grad[0] else None, grad_w.to(ctx.weight_dtype),
                grad_b if ctx.has_bias else None, None, None, None, None, None, None)

    torch.library.register_autograd(f"{_LIB}::int8_linear_forward", _backward,
                                    setup_context=_setup_context)
    not_differentiable("int8_linear_backward", "linear (int8)")

    @torch.library.register_fake(f"{_LIB}::int8_feed_forward_forward")
    def _(x, w1, b1, w1_codes, w1_scales, w2, b2, w2_codes, w2_scales, x_codes=None,
          x_scales=None):
        M, C = x.shape
        F = w1.shape[0]
        i8, f32 = torch.int8, torch.float32
        Mx, Cx = (M, C) if x_codes is None else (0, 0)  # given codes are not returned
        return (x.new_empty((M, C)), x.new_empty((M, F)), x.new_empty((Mx, Cx), dtype=i8),
                x.new_empty((Mx,), dtype=f32), x.new_empty((M, F), dtype=i8),
                x.new_empty((M,), dtype=f32))

    @torch.library.register_fake(f"{_LIB}::int8_feed_forward_backward")
    def _(grad_y, pre, x_codes, x_scales, h_codes, h_scales, w1_codes, w1_scales, w2_codes,
          w2_scales, need_grad_x):
        M, C = grad_y.shape
        F = w1_codes.shape[0]
        f32 = torch.float32
        return (grad_y.new_empty((M, C) if need_grad_x else (0, 0)),
                grad_y.new_empty((F, C), dtype=f32), grad_y.new_empty((F,), dtype=f32),
                grad_y.new_empty((C, F), dtype=f32), grad_y.new_empty((C,), dtype=f32))

    def _ff_setup_context(ctx, inputs, output):
        x, w1, b1, w1_codes, w1_scales, w2, b2, w2_codes, w2_scales = inputs[:9]
        _, pre, x_codes, x_scales, h_codes, h_scales = output
        if len(inputs) > 9 and inputs[9] is not None:  # the producer's codes, not returned
            x_codes, x_scales = inputs[9:11]
        ctx.set_materialize_grads(False)
        ctx.has_bias = (b1 is not None, b2 is not None)
        ctx.weight_dtypes = (w1.dtype, w2.dtype)
        ctx.save_for_backward(pre, x_codes, x_scales, h_codes, h_scales, w1_codes, w1_scales,
                              w2_codes, w2_scales)

    def _ff_backward(ctx, grad_y, *_unused):
        first_order_only("feed-forward (int8)")
        if grad_y is None:  # only the saved tensors were used: not differentiable here
            return (None,) * 11
        grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = (
            torch.ops.ryzen_llm.int8_feed_forward_backward(
                grad_y.contiguous(), *ctx.saved_tensors, ctx.needs_input_grad[0]))
        return (grad_x if ctx.needs_input_grad[0] else None, grad_w1.to(ctx.weight_dtypes[0]),
                grad_b1 if ctx.has_bias[0] else None, None, None,
                grad_w2.to(ctx.weight_dtypes[1]), grad_b2 if ctx.has_bias[1] else None, None,
                None, None, None)

    torch.library.register_autograd(f"{_LIB}::int8_feed_forward_forward", _ff_backward,
                                    setup_context=_ff_setup_context)
    not_differentiable("int8_feed_forward_backward", "feed-forward (int8)")


def _rows(x: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Size]:
    """x (..., K) as contiguous (M, K) rows in its autocast dtype (float32 or bfloat16), and its
    leading dims."""
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"{op}: x must be float32 or bfloat16 (or autocast to one), got {dtype}")
    return x.reshape(-1, x.shape[-1]).to(dtype).contiguous(), x.shape[:-1]


def int8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                gelu: bool = False) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T + bias (N,), GELU'd when gelu, with int8 GEMMs (see the
    module docstring); reference.int8_linear_forward/backward are its exact math. Under
    autocast x is cast to the autocast dtype, as F.linear would; the bias stays float32 and is
    added in float32. The result has x's (autocast) dtype."""
    x2, lead = _rows(x, "int8_linear")
    codes = weight_codes(weight)
    b = bias.float().contiguous() if bias is not None else None
    y, _, _, _ = torch.ops.ryzen_llm.int8_linear_forward(x2, weight, b, *codes, gelu,
                                                          INT8_WEIGHT_GRAD,
                                                          *given_row_codes(x, x2))
    return y.view(*lead, y.shape[-1])


# Per device type: whether this build has the one-op feed-forward.
FEED_FORWARD_KERNEL = kernel_devices("int8_feed_forward_forward")


def int8_feed_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                      w2: torch.Tensor, b2: torch.Tensor | None) -> torch.Tensor:
    """fc2(GELU(fc1(x))) with int8 GEMMs: the math of int8_linear(int8_linear(x, w1, b1, True),
    w2, b2), bit for bit (grad_b1 sums the rounded gradient, as the reference does), in one op
    whose GEMM epilogues write the int8 operands of the next GEMM (csrc/cpu/int8_feed_forward.cpp):
    the GELU activation is never a tensor, and backward quantizes fc1's gradient where it is
    made. Where that op has no kernel (a device other than the CPU, or the float weight gradient,
    INT8_WEIGHT_GRAD False) it runs as those two int8_linear calls."""
    if not (INT8_WEIGHT_GRAD and FEED_FORWARD_KERNEL.get(x.device.type, False)):
        return int8_linear(int8_linear(x, w1, b1, True), w2, b2)
    x2, lead = _rows(x, "int8_feed_forward")
    biases = [b.float().contiguous() if b is not None else None for b in (b1, b2)]
    y = torch.ops.ryzen_llm.int8_feed_forward_forward(
        x2, w1, biases[0], *weight_codes(w1), w2, biases[1], *weight_codes(w2),
        *given_row_codes(x, x2))[0]
    return y.view(*lead, y.shape[-1])


SPECS = (OpSpec("linear", 4, int8_linear, reference.linear,
                "the model's linear layers (qkv, proj, fc1 + GELU, fc2) on int8 GEMMs"),)
