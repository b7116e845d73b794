"""Emulate an int8 weight gradient for the level-4 LM head and train the seed's model with it.

    python scripts/emulate_lm_head_weight_grad.py MODE [compare_with_plain_gpt.py's arguments]
    python scripts/emulate_lm_head_weight_grad.py global_sr --steps 200 --variants current --level 4

The level-4 model as it is, except that its LM head runs in plain PyTorch (reference.py's math:
int8 logits, grad_h an int8 GEMM of the logits' gradient G quantized per row with stochastic
rounding) with grad_weight = G.T @ h computed as one of:

- bf16w:     G.T @ h in h's dtype, as the kernel computed it before INT8_GRAD_WEIGHT;
- col_sr:    (G * h_scales) quantized per vocabulary column over the N rows, stochastically
             rounded, times h's row codes: the int8 linear's weight-gradient recipe;
- col_rtn:   the same, rounded to nearest;
- global_sr: one scale for every column, the bound max(h_scales) / N / 127 (|G| <= 1 / N with
             every target counted), known before G is, so that a chunked kernel can write the
             codes chunk by chunk: what the kernel does (INT8_GRAD_WEIGHT);
- kernel:    the library's kernel as it is (no emulation), for comparison.

The int products are exact (float64 sums of int8 x int8 products). The stochastic rounding draws
its uniforms from torch.rand (a seeded generator), not from the kernels' counter hash: the same
distribution, not the same draws. Prints compare_with_plain_gpt.py's loss line.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_with_plain_gpt as compare  # noqa: E402
from ryzen_llm.ops import reference  # noqa: E402

MODES = ("kernel", "bf16w", "col_sr", "col_rtn", "global_sr")
_GEN = torch.Generator().manual_seed(1234)


def _codes(v: torch.Tensor, scale: torch.Tensor, stochastic: bool) -> torch.Tensor:
    """v / scale rounded (stochastically or to nearest) and clamped to [-127, 127], as floats."""
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    if not stochastic:
        return torch.round(v * inv).clamp(-127, 127)
    return torch.floor(v * inv + torch.rand(v.shape, generator=_GEN)).clamp(-127, 127)


def _weight_grad(mode: str, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """grad_weight (V, C) of the LM head from G (N, V) and h (N, C) in the given mode."""
    if mode == "bf16w":
        return g.t() @ h
    hq, hs = reference.int8_quantize(h.float(), 1)  # h's row codes, as the forward made them
    gv = g.float() * hs[:, None]
    if mode.startswith("col"):
        scale = gv.abs().amax(0) / 127.0
    else:
        scale = torch.full((gv.shape[1],), float(hs.max()) / gv.shape[0] / 127.0)
    q = _codes(gv, scale[None, :], stochastic=mode.endswith("_sr"))
    return (q.t().double() @ hq.double()).float() * scale[:, None]


def _make_head(mode: str):
    class _Head(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, weight):
            ctx.save_for_backward(h, weight)
            return h @ weight.t()

        @staticmethod
        def backward(ctx, grad):
            h, weight = ctx.saved_tensors
            g = grad.to(h.dtype)
            wq, ws = reference.int8_quantize(weight.float(), 1)
            v = g.float() * ws[None, :]
            scale = v.abs().amax(1) / 127.0
            q = _codes(v, scale[:, None], stochastic=True)
            grad_h = ((q.double() @ wq.double()).float() * scale[:, None]).to(h.dtype)
            return grad_h, _weight_grad(mode, g, h).to(weight.dtype)

    def head(h, weight, targets, ignore_index=-100):
        w = weight.to(h.dtype)
        exact = _Head.apply(h, w)
        int8 = reference.int8_linear_forward(h.detach(), weight.detach(), None)
        logits = exact + (int8 - exact).detach()
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)

    return head


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in MODES:
        print(f"usage: {sys.argv[0]} {{{','.join(MODES)}}} [compare_with_plain_gpt.py arguments]",
              file=sys.stderr)
        return 2
    mode = sys.argv.pop(1)
    library_step = compare.library_step

    def emulated_step(config, variant, level, lr):
        step, evaluate = library_step(config, variant, level, lr)
        if mode != "kernel":
            step.kernels._fn["int8_linear_cross_entropy"] = _make_head(mode)
        return step, evaluate

    compare.library_step = emulated_step
    return compare.main()


if __name__ == "__main__":
    sys.exit(main())
