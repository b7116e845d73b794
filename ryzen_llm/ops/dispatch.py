"""The one place that decides which implementation of each op runs: fused (ryzen_llm._C) or
reference (plain PyTorch).

An optimization level asks for the fused ops up to that level (LEVEL_OF_OP). An op that level
asks for but that is not available (extension not built, or no fused kernel for it yet) runs its
reference and the choice records why, so that the trainer's report and `doctor` say so. An op
asked for explicitly through RYZEN_LLM_OPS (`causal_attention=fused`, or `fused` for all) raises
instead of falling back. `reference` (or `op=reference`) forces the plain path.

Every call through a KernelSet is counted per (op, implementation): the report shows what ran,
not what was configured.
"""
from __future__ import annotations

import functools
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ryzen_llm.ops import reference
from ryzen_llm.ops._extension import extension_error, extension_loaded
from ryzen_llm.ops.registry import registry

# Derived from the ops' declarations (ryzen_llm/ops/<op>.py, see ryzen_llm.ops.registry).
OP_SPECS = registry()
# The level at which each op switches to its fused kernel.
LEVEL_OF_OP: dict[str, int] = {name: spec.level for name, spec in OP_SPECS.items()}
OPS = tuple(LEVEL_OF_OP)
# The optimization levels: 0 (plain PyTorch) up to the highest level an op declares.
LEVELS = tuple(range(max(LEVEL_OF_OP.values()) + 1))
# Ops only generation calls (ryzen_llm.engine); a training run reports them as not called.
INFERENCE_OPS = frozenset(name for name, spec in OP_SPECS.items() if spec.inference_only)
# The ops a fused decode_block runs inside it, per call (quantize_kv only with an int8 cache).
DECODE_BLOCK_OPS = dict(OP_SPECS["decode_block"].runs_inside)


def _fused_registry() -> dict[str, Callable]:
    """Fused ops that exist in this build (empty when the extension did not load)."""
    if not extension_loaded():
        return {}
    return {name: spec.fused for name, spec in OP_SPECS.items()}


class FusedOpUnavailable(RuntimeError):
    """A fused op was asked for explicitly and cannot run."""


@dataclass(frozen=True)
class OpChoice:
    impl: str  # "fused" or "reference"
    reason: str  # why: "level 2", "level 0 (baseline)", "fused kernel not built: ...", ...


def _parse_env(env: str | None) -> dict[str, str]:
    """RYZEN_LLM_OPS: 'fused', 'reference', or 'op=fused,op=reference'."""
    if not env:
        return {}
    env = env.strip()
    if env in ("fused", "reference"):
        return {op: env for op in OPS}
    out = {}
    for item in env.split(","):
        op, _, impl = item.strip().partition("=")
        if op not in LEVEL_OF_OP or impl not in ("fused", "reference"):
            raise ValueError(
                f"RYZEN_LLM_OPS item {item!r}: expected op=fused|reference with op one of "
                f"{', '.join(OPS)}"
            )
        out[op] = impl
    return out


def resolve(level: int, overrides: dict[str, str] | None = None,
            unavailable: dict[str, str] | None = None) -> dict[str, OpChoice]:
    """Per op: which implementation runs at this level, and why. unavailable: ops whose fused
    kernel cannot run where the caller runs them (op -> why, e.g. no kernel for its device)."""
    if level not in LEVELS:
        raise ValueError(f"optimization level: expected one of {', '.join(map(str, LEVELS))}, "
                         f"got {level!r}")
    explicit = _parse_env(os.environ.get("RYZEN_LLM_OPS"))
    for op, impl in (overrides or {}).items():
        if op not in LEVEL_OF_OP or impl not in ("fused", "reference"):
            raise ValueError(f"kernel override {op}={impl}: expected op=fused|reference with op "
                             f"one of {', '.join(OPS)}")
    explicit.update(overrides or {})
    fused = {op: fn for op, fn in _fused_registry().items() if op not in (unavailable or {})}
    choices = {}
    for op, op_level in LEVEL_OF_OP.items():
        wanted = explicit.get(op)
        if wanted == "reference":
            choices[op] = OpChoice("reference", "forced by override")
            continue
        if wanted is None and level < op_level:
            why = "level 0 (baseline)" if level == 0 else f"level {level} < {op_level}"
            choices[op] = OpChoice("reference", why)
            continue
        if op in fused:
            choices[op] = OpChoice("fused", "forced by override" if wanted else f"level {level}")
            continue
        if not extension_loaded():
            missing = f"extension not loaded ({extension_error()})"
        else:
            missing = (unavailable or {}).get(op, "no fused kernel for this op in this build")
        if wanted == "fused":
            raise FusedOpUnavailable(f"fused {op} was requested but is unavailable: {missing}")
        choices[op] = OpChoice("reference", f"FELL BACK: {missing}")
    return choices


class KernelSet:
    """The ops a model calls, bound to one implementation each, with call counts."""

    def __init__(self, level: int = 0, overrides: dict[str, str] | None = None,
                 unavailable: dict[str, str] | None = None):
        self.level = level
        self.choices = resolve(level, overrides, unavailable)
        fused = _fused_registry()
        self._fn = {
            op: fused[op] if c.impl == "fused" else OP_SPECS[op].reference
            for op, c in self.choices.items()
        }
        # The int8 KV cache's writes run fused exactly when the decode op that reads them does.
        if self.choices["causal_attention_decode"].impl == "fused":
            from ryzen_llm.ops.quantize import quantize_kv
        else:
            quantize_kv = reference.quantize_kv
        self._quantize_kv = quantize_kv
        if self.choices["linear"].impl == "fused" and "gelu_feed_forward" in self.choices:
            c = self.choices["gelu_feed_forward"]
            self.choices["gelu_feed_forward"] = OpChoice(
                c.impl,
                c.reason + "; the int8 linears run the feed-forward instead (two calls, one op)")
        if self.choices["int8_linear_cross_entropy"].impl == "fused":
            c = self.choices["int8_linear_cross_entropy"]
            self.choices["int8_linear_cross_entropy"] = OpChoice(
                c.impl, c.reason + "; on a device without its kernel linear_cross_entropy runs")
        self.calls: Counter[tuple[str, str]] = Counter()
        # What one fused decode step runs, per (blocks, int8 cache): counted with one update
        self._step_calls: dict[tuple[int, bool], Counter[tuple[str, str]]] = {}
        self._key = {op: (op, c.impl) for op, c in self.choices.items()}
        fell_back = [op for op, c in self.choices.items() if c.reason.startswith("FELL BACK")]
        if fell_back:
            warnings.warn(
                f"optimization level {level}: fused {', '.join(fell_back)} unavailable, "
                "running the plain-PyTorch reference for "
                + ("it" if len(fell_back) == 1 else "them"),
                stacklevel=2,
            )

    def count(self, key: tuple[str, str], n: int = 1) -> None:
        """Counts n calls of key = (op, impl). Not while torch.compile traces: the counter is a
        Python side effect, and dynamo would guard on its value and recompile on every call."""
        if not torch.compiler.is_compiling():
            self.calls[key] += n

    def _run(self, op: str, *args):
        self.count(self._key[op])
        return self._fn[op](*args)

    def __getattr__(self, name: str):
        """kernels.<op>(*args) for a declared op without a method of its own below: runs the
        chosen implementation and counts the call, so a new op needs no method here. The
        methods below document the model's ops with their shapes, or do more than pass their
        arguments through."""
        choices = self.__dict__.get("choices")
        if choices is not None and name in choices:
            return functools.partial(self._run, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def add_layer_norm(self, x, residual, weight, bias, eps):
        """(x + residual, LayerNorm(x + residual)); residual may be None. Where the int8 linears
        read the output (level 4) and the device has the kernel, the fused op also writes the
        output's int8 row codes, which those linears then read instead of quantizing it (not
        under torch.compile or inference mode)."""
        if (self._row_codes and not torch.compiler.is_compiling()
                and not torch.is_inference_mode_enabled()):
            from ryzen_llm.ops.add_layer_norm import ROW_CODES_KERNEL, add_layer_norm_with_row_codes

            if ROW_CODES_KERNEL.get(x.device.type, False):
                self.count(self._key["add_layer_norm"])
                return add_layer_norm_with_row_codes(x, residual, weight, bias, eps)
        return self._run("add_layer_norm", x, residual, weight, bias, eps)

    @property
    def _row_codes(self) -> bool:
        """Whether add_layer_norm writes row codes for the int8 linears (see add_layer_norm)."""
        from ryzen_llm.ops import linear

        return (linear.ROW_CODES_FROM_LAYER_NORM and self.choices["linear"].impl == "fused"
                and self.choices["add_layer_norm"].impl == "fused")

    def bias_gelu(self, x, bias):
        return self._run("bias_gelu", x, bias)

    def split_heads(self, qkv, n_heads):
        """q, k, v (B, nh, T, hs) as views of qkv (B, T, 3 * C). Where the fused attention runs,
        through causal_attention.split_heads (one pass in backward instead of a copy per
        gradient and a concatenation); otherwise the plain split and transposes."""
        if self.choices["causal_attention"].impl == "fused":
            from ryzen_llm.ops.causal_attention import split_heads

            return split_heads(qkv, n_heads)
        B, T, C3 = qkv.shape
        C = C3 // 3
        return tuple(t.view(B, T, n_heads, C // n_heads).transpose(1, 2)
                     for t in qkv.split(C, dim=-1))

    def causal_attention(self, q, k, v, key_padding_mask, scale):
        """q, k, v: (B, nh, T, hs); key_padding_mask: (B, T) bool, True = real token, or None."""
        return self._run("causal_attention", q, k, v, key_padding_mask, scale)

    def causal_attention_decode(self, q, k_cache, v_cache, cache_lengths, scale, k_scale=None,
                                v_scale=None):
        """q: (B, nh, 1, hs); caches: (B, nh, Tmax, hs); cache_lengths: (B,) int64 valid keys
        per row, the new token included; k_scale, v_scale: (B, nh, Tmax) float32 with int8
        caches. Returns (B, nh, 1, hs)."""
        return self._run("causal_attention_decode", q, k_cache, v_cache, cache_lengths, scale,
                         k_scale, v_scale)

    def quantize_kv(self, x):
        """int8 codes (..., hs) and float32 scales (...) of keys or values x (..., hs), for an
        int8 KV cache (reference.quantize_kv; bit-identical fused or not)."""
        impl = self.choices["causal_attention_decode"].impl
        self.count(("quantize_kv", impl))
        return self._quantize_kv(x)

    def decode_linear(self, x, weight, bias, gelu=False, out_features=-1):
        """x @ weight.T + bias (GELU'd when gelu) for generation; the fused kernel's rows do not
        depend on the batch (see ryzen_llm.ops.decode_linear). weight: decode_weight(linear);
        out_features: N, needed with a packed weight and no bias."""
        if out_features >= 0 and weight.dim() != 2:
            return self._run("decode_linear", x, weight, bias, gelu, out_features)
        return self._run("decode_linear", x, weight, bias, gelu)

    def decode_weight(self, linear: torch.nn.Linear) -> torch.Tensor:
        """The weight decode_linear reads for `linear`: its packed bfloat16, int8 or int4 copy
        (ScaledTransformerModel.cast_linear_weights) where the fused kernel runs, else the weight
        (after an int8/int4 cast, its dequantized float32 values)."""
        packed = getattr(linear, "decode_weight", None)
        if packed is not None and self.choices["decode_linear"].impl == "fused":
            return packed
        return linear.weight

    @functools.cached_property
    def fused_decode_block(self) -> bool:
        """True when a decode step runs as one fused op (decode_step): decode_block and every op
        it runs inside are fused (an op forced to its reference keeps the composed path)."""
        return all(self.choices[op].impl == "fused" for op in ("decode_block", *DECODE_BLOCK_OPS))

    def decode_step(self, model, idx, cache):
        """Logits of a whole decode step in one fused op (see ryzen_llm.ops.decode_block); only
        when fused_decode_block. Counts what the op runs: the first LayerNorm, one decode_block
        per block (and what it runs inside), the LM head's decode_linear."""
        n, quantized = len(model.blocks), cache.k_scale is not None
        calls = self._step_calls.get((n, quantized))
        if calls is None:
            calls = Counter({("decode_block", "fused"): n})
            for op, k in DECODE_BLOCK_OPS.items():
                calls[(op, "fused")] += k * n
            calls[("add_layer_norm", "fused")] += 1  # the first LayerNorm
            calls[("decode_linear", "fused")] += 1  # the LM head
            if quantized:
                calls[("quantize_kv", "fused")] += n
            self._step_calls[(n, quantized)] = calls
        if not torch.compiler.is_compiling():
            self.calls.update(calls)
        return self._fn["decode_block"](model, idx, cache, self.decode_weight)  # decode_step

    @property
    def fused_prefill(self) -> bool:
        """True when a prefill runs as one fused op (prefill_step): what a fused decode step
        runs, and the fused causal attention."""
        return self.fused_decode_block and self.choices["causal_attention"].impl == "fused"

    def prefill_step(self, model, idx, key_padding_mask, prompt_lengths, cache):
        """Logits of each prompt's last real token after a whole prefill in one fused op (see
        ryzen_llm.ops.decode_block); only when fused_prefill. Counts what the op runs."""
        n = len(model.blocks)
        self.count(("add_layer_norm", "fused"), 1 + 2 * n)
        self.count(("decode_linear", "fused"), 4 * n + 1)
        self.count(("causal_attention", "fused"), n)
        if cache.k_scale is not None:
            self.count(("quantize_kv", "fused"), n)
        from ryzen_llm.ops.decode_block import prefill_step  # fused_prefill: it exists

        return prefill_step(model, idx, key_padding_mask, prompt_lengths, cache,
                            self.decode_weight)

    def greedy_pick(self, logits):
        """(tokens, logprobs, logsumexp) of each row of logits (B, V): the greedy token (the
        first argmax), its log-probability under softmax and the row's log-sum-exp."""
        return self._run("greedy_pick", logits)

    @property
    def batch_invariant_decode(self) -> bool:
        """True when a decode step's rows are computed independently of the batch size."""
        return self.choices["decode_linear"].impl == "fused"

    def linear(self, x, weight, bias, gelu=False):
        """x @ weight.T + bias (GELU'd when gelu): F.linear below level 4, int8 GEMMs from it."""
        return self._run("linear", x, weight, bias, gelu)

    def gelu_feed_forward(self, x, w1, b1, w2, b2):
        if self.choices["linear"].impl == "fused":
            # level 4: two int8 linears in one op (bias + GELU and fc2's quantization in fc1's
            # epilogue), counted as the two linear calls they are
            from ryzen_llm.ops.linear import int8_feed_forward

            self.count(self._key["linear"], 2)
            return int8_feed_forward(x, w1, b1, w2, b2)
        if self.choices["gelu_feed_forward"].impl == "fused":
            return self._run("gelu_feed_forward", x, w1, b1, w2, b2)
        # Not fused as a whole: the GEMMs stay ATen's and bias + GELU goes through its own op.
        self.count(("gelu_feed_forward", "reference"))
        return F.linear(self.bias_gelu(F.linear(x, w1), b1), w2, b2)

    def adamw(self, params, **kwargs) -> torch.optim.Optimizer:
        """The optimizer this level chose (FusedAdamW or torch.optim.AdamW) over params; its
        steps are counted by the trainer, one per optimizer step."""
        return self._fn["adamw"](params, **kwargs)

    def linear_cross_entropy(self, h, weight, targets, ignore_index):
        """Mean cross-entropy of (h @ weight.T) against targets; h: (N, C), weight: (V, C). From
        level 4 its logits GEMM runs on int8 codes (int8_linear_cross_entropy) where the build has
        that kernel for h's device; elsewhere linear_cross_entropy runs as chosen (counted as
        such)."""
        if self.choices["int8_linear_cross_entropy"].impl == "fused":
            from ryzen_llm.ops.linear_cross_entropy import INT8_KERNEL

            if INT8_KERNEL.get(h.device.type, False):
                return self._run("int8_linear_cross_entropy", h, weight, targets, ignore_index)
        return self._run("linear_cross_entropy", h, weight, targets, ignore_index)

    def summary(self) -> dict[str, dict]:
        """Per op: configured implementation, reason, and the calls counted per implementation."""
        out = {}
        for op, c in self.choices.items():
            counted = {impl: n for (o, impl), n in self.calls.items() if o == op}
            out[op] = {"impl": c.impl, "reason": c.reason, "calls": counted}
        return out


class KernelOptimizer:
    """Binds a model's ops to the implementations of an optimization level.

    0 = plain PyTorch fp32 (the baseline); 1 = fused LayerNorm, GELU, cross-entropy;
    2 = + fused attention; 3 = + fused feed-forward and AdamW, and bf16 mixed precision where
    the CPU has native bf16 (see TrainStep); 4 = + the blocks' linear layers on int8 GEMMs
    (ryzen_llm.ops.linear; CPU kernels, and on CUDA an ATen composition of the same ops).
    """

    def __init__(self, level: int = 3, overrides: dict[str, str] | None = None,
                 unavailable: dict[str, str] | None = None):
        self.level = level
        self.kernels = KernelSet(level, overrides, unavailable)

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        for module in model.modules():
            if hasattr(module, "kernels"):
                module.kernels = self.kernels
        model.kernel_level = self.level
        return model
