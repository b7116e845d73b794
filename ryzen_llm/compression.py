"""Activation compression: the tensors autograd saves for backward are stored as block-wise int8
(or 4-bit) codes during the forward and restored in the backward.

    compressor = ActivationCompressor(model, ratio=0.3)   # int8, block 64: 0.266 of fp32 bytes
    with compressor.hooks(tokens=idx.numel()):
        loss = model.loss(idx, targets)
    loss.backward()                                       # restores each tensor as it is needed

What is compressed: floating tensors of at least max(min_numel, block_size * tokens) values (one
quantization block per token or more) that are not parameters nor derived straight from one: the
feed-forward input and pre-activation, the attention input, q/k/v and probabilities, the
LayerNorm inputs. A non-contiguous view is compressed as the contiguous tensor it views
(CompressedView: no copy; attention's q, k and v share their qkv tensor's codes). A dtype cast of
a parameter (autocast's bf16 weight copy, its transpose) is not held at all: backward casts the
parameter again (ParameterCast), which costs a cast and saves the copy's bytes (docs/memory.md).
Per-row statistics (LayerNorm's mean and rstd: one value per token; attention's log-sum-exp: one
per token and head, whose error would scale whole rows of the probabilities backward recomputes)
and tensors without autograd history (the gradients the fused cross-entropy computes in its
forward) stay exact. 4-bit codes round stochastically, int8 codes to nearest. A tensor saved by
several nodes is compressed once.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass

import torch

from ryzen_llm.ops._extension import extension_error, extension_loaded
from ryzen_llm.ops.quantize import QuantizedTensor, compressed_ratio, quantize_blockwise

# compression_ratio at or above this uses int8 (0.266 at block 64); below it, 4-bit (0.141).
INT8_MIN_RATIO = 0.27


def bits_for_ratio(ratio: float) -> int:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"compression_ratio: expected a value in (0, 1], got {ratio!r}")
    return 8 if ratio >= INT8_MIN_RATIO else 4


# Autograd nodes of casts and views: a chain of them back to a leaf means "a parameter, reshaped".
_VIEW_OR_CAST = {
    "ToCopyBackward0", "TBackward0", "TransposeBackward0", "TransposeBackward1", "PermuteBackward0",
    "ViewBackward0", "UnsafeViewBackward0", "ExpandBackward0", "AliasBackward0", "CloneBackward0",
}


_VIEWS = _VIEW_OR_CAST - {"ToCopyBackward0", "CloneBackward0"}


@dataclass
class ParameterCast:
    """A saved dtype cast of a parameter (autocast's bf16 weight copy, or a view of it), kept as
    the recipe instead of the bytes: unpack casts the parameter again, bit for bit the same."""

    param: torch.Tensor
    dtype: torch.dtype
    size: tuple
    stride: tuple
    offset: int
    version: int

    def restore(self) -> torch.Tensor:
        if self.param._version != self.version:
            raise RuntimeError(
                "a parameter was modified in place between the forward and the backward; its "
                "saved cast cannot be recomputed (run the backward before updating weights)"
            )
        return self.param.detach().to(self.dtype).as_strided(self.size, self.stride, self.offset)


def _parameter_cast(t: torch.Tensor) -> ParameterCast | None:
    """The recipe for t when t is param.to(dtype) of a contiguous parameter, possibly viewed
    (transposed, reshaped): the only layouts a fresh cast reproduces exactly."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _VIEWS:
        nexts = [nf for nf, _ in fn.next_functions if nf is not None]
        if len(nexts) != 1:
            return None
        fn = nexts[0]
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return None
    nexts = [nf for nf, _ in fn.next_functions if nf is not None]
    if len(nexts) != 1 or type(nexts[0]).__name__ != "AccumulateGrad":
        return None
    param = nexts[0].variable
    if (not param.is_contiguous() or param.dtype == t.dtype
            or t.untyped_storage().nbytes() != param.numel() * t.element_size()):
        return None
    return ParameterCast(param, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset(),
                         param._version)


def _derived_from_parameter(fn, depth: int = 6) -> bool:
    """True when fn is a chain of casts/views ending at a parameter (autocast's bf16 weight
    copy, its transpose): such tensors belong to the weights, not to the activations."""
    while fn is not None and depth > 0 and type(fn).__name__ in _VIEW_OR_CAST:
        nexts = [nf for nf, _ in fn.next_functions if nf is not None]
        if len(nexts) != 1:
            return False
        fn = nexts[0]
        if type(fn).__name__ == "AccumulateGrad":
            return True
        depth -= 1
    return False


class _Whole:
    """One compressed tensor that several saved views share: restored once for all of them. The
    restored tensor is held from the first view's unpack to the last one's (a backward node
    unpacks its saved tensors together), then only by the restored views."""

    def __init__(self, qt: QuantizedTensor):
        self.qt = qt
        self.views = 0  # CompressedViews packed on it
        self._pending = 0
        self._restored: torch.Tensor | None = None

    def restore(self) -> torch.Tensor:
        if self._restored is None:
            self._restored = self.qt.dequantize()
            self._pending = self.views
        t = self._restored
        self._pending -= 1
        if self._pending <= 0:  # every view has it (an extra unpack restores it again)
            self._restored = None
        return t


@dataclass
class CompressedView:
    """A saved strided view (attention's q, k, v of one qkv tensor; its output laid out (B, T,
    H, D)) kept as the compressed whole it views and the view's geometry: no copy is made to
    compress it, and the views of one tensor share one set of codes."""

    whole: _Whole
    size: tuple
    stride: tuple
    offset: int  # from the whole's first element

    def restore(self) -> torch.Tensor:
        return self.whole.restore().as_strided(self.size, self.stride, self.offset)


def _viewed_whole(t: torch.Tensor) -> torch.Tensor | None:
    """The contiguous tensor a non-contiguous t views, when it holds at most 3x t's values (q, k
    and v are each a third of their qkv tensor); None otherwise."""
    base = t._base
    if (t.is_contiguous() or base is None or not base.is_contiguous() or base.dtype != t.dtype
            or base.numel() > 3 * t.numel()):
        return None
    return base


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            t.dtype, t._version)


class ActivationCompressor:
    """saved_tensors_hooks that quantize large saved activations (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, ratio: float, block_size: int = 64, min_numel: int = 1024):
        self.bits = bits_for_ratio(ratio)
        self.ratio = compressed_ratio(1 << 20, block_size, self.bits)
        self.block_size = block_size
        self.min_numel = min_numel
        self.fused = extension_loaded()
        if not self.fused:
            warnings.warn(
                f"activation compression: quantize kernel unavailable ({extension_error()}), "
                "running the plain-PyTorch reference",
                stacklevel=2,
            )
        self._param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.packed_tensors = 0  # counted over the life of the compressor
        self.kept_tensors = 0
        self.recast_tensors = 0

    def _wanted(self, t: torch.Tensor, min_numel: int) -> bool:
        if not t.is_floating_point() or t.numel() < min_numel or t.device.type != "cpu":
            return False
        if t.untyped_storage().data_ptr() in self._param_storages:
            return False
        if t.grad_fn is None and not t.requires_grad:
            return False  # no autograd history: a gradient computed ahead (fused CE's grad_h)
        return not _derived_from_parameter(t.grad_fn)

    def pack_fn(self, tokens: int = 0):
        """(pack, unpack, done) for torch.autograd.graph.saved_tensors_hooks, one forward's worth."""
        # Fewer values per token than one block: a per-row statistic, kept exact.
        min_numel = max(self.min_numel, self.block_size * tokens)
        # The same tensor saved by several nodes is compressed once. The weak reference tells a
        # live tensor from a new one the allocator put at a freed one's address.
        seen: dict[tuple, tuple[weakref.ref, QuantizedTensor]] = {}

        def pack(t: torch.Tensor):
            if not self._wanted(t, min_numel):
                cast = _parameter_cast(t) if t.grad_fn is not None else None
                if cast is not None:
                    self.recast_tensors += 1
                    return cast
                self.kept_tensors += 1
                return t
            whole = _viewed_whole(t)
            if whole is not None:
                shared = compressed(whole, True)
                shared.views += 1
                return CompressedView(shared, tuple(t.shape), tuple(t.stride()),
                                      t.storage_offset() - whole.storage_offset())
            return compressed(t, False)

        def compressed(t: torch.Tensor, shared: bool):
            key = _key(t)
            hit = seen.get(key)
            if hit is not None and hit[0]() is not None:
                return hit[1]
            # 4-bit codes round stochastically (unbiased, so the gradient error averages out
            # over steps), seeded by a counter: reproducible run to run.
            qt = quantize_blockwise(t, self.block_size, self.bits, stochastic=self.bits == 4,
                                    seed=self.packed_tensors, fused=self.fused)
            packed = _Whole(qt) if shared else qt
            seen[key] = (weakref.ref(t), packed)
            self.packed_tensors += 1
            return packed

        def unpack(packed):
            if isinstance(packed, QuantizedTensor):
                return packed.dequantize()
            return packed.restore() if isinstance(packed, (ParameterCast, CompressedView)) else packed

        return pack, unpack, seen.clear

    @contextlib.contextmanager
    def hooks(self, tokens: int = 0):
        pack, unpack, done = self.pack_fn(tokens)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield
        finally:
            done()
