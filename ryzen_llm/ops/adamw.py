"""Fused multi-tensor AdamW: the Python face of torch.ops.ryzen_llm.adamw_step_ and
adamw_master_step_.

The trainer builds it in place of torch.optim.AdamW, with the same arguments:

    from ryzen_llm.ops.adamw import FusedAdamW
    opt = FusedAdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

(or through dispatch: `_fused_registry()["adamw"]` is this class).
"""
from __future__ import annotations

import functools
import sys
from collections import defaultdict

import torch

from ryzen_llm.ops._extension import extension_loaded
from ryzen_llm.ops._spec import OpSpec

if extension_loaded():
    # The ops mutate their list arguments in place and return nothing: no autograd, and
    # torch.compile only needs to know they return None.
    @torch.library.register_fake("ryzen_llm::adamw_step_")
    def _(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step,
          grad_scale=1.0):
        return None

    @torch.library.register_fake("ryzen_llm::adamw_master_step_")
    def _(params, master_params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps,
          weight_decay, step, grad_scale=1.0):
        return None


def _plain_until_dynamo_loads(method):
    """torch.optim.Optimizer wraps add_param_group, zero_grad, state_dict and load_state_dict in
    torch._disable_dynamo, whose first call imports torch._dynamo (and sympy with it): tens of
    MiB of resident memory in a training process that never compiles (docs/memory.md). The wrapper only matters
    while dynamo traces, which needs torch._dynamo imported; until then the plain method runs."""
    plain = getattr(method, "__wrapped__", method)

    @functools.wraps(plain)
    def call(*args, **kwargs):
        if "torch._dynamo" in sys.modules:
            return method(*args, **kwargs)
        return plain(*args, **kwargs)

    return call


class FusedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW (decoupled weight decay, bias correction; no amsgrad, no maximize) with
    one fused C++ pass over all parameters of a group per step.

    float32/float64 parameters: the update matches torch.optim.AdamW to a few ulp. bfloat16
    parameters: the optimizer keeps a float32 master copy (state key 'master_param', created
    from the parameter on the first step) and float32 moments, runs the update on the master and
    writes the rounded master into the parameter; rounding each step's tiny update onto the
    bfloat16 weights directly would lose most of it. State per parameter: 'step' (float32
    scalar tensor, as torch's), 'exp_avg', 'exp_avg_sq' (+ 'master_param' for bfloat16), so
    state dicts load both ways with torch.optim.AdamW for float32 models.

    state_dtype=torch.bfloat16 keeps the moments of float32 parameters in bfloat16 (CPU only):
    half the optimizer state's bytes. The update still runs in float32; the new moments are
    rounded stochastically (csrc/cpu/adamw.cpp says why). Moments loaded in another dtype (a
    state dict, which torch's load_state_dict casts to the parameter's dtype) are converted on
    the next step. Other parameters keep moments of their own dtype (float32 for bfloat16)."""

    STATE_DTYPES = (torch.float32, torch.bfloat16)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 state_dtype: torch.dtype = torch.float32):
        if not 0.0 <= lr:
            raise ValueError(f"lr: expected a non-negative value, got {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"eps: expected a non-negative value, got {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas: expected values in [0, 1), got {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay: expected a non-negative value, got {weight_decay}")
        if state_dtype not in self.STATE_DTYPES:
            raise ValueError(f"state_dtype: expected torch.float32 or torch.bfloat16, got {state_dtype}")
        self.state_dtype = state_dtype
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        if state_dtype == torch.bfloat16:
            devices = {p.device.type for g in self.param_groups for p in g["params"]} - {"cpu"}
            if devices:
                raise ValueError(f"state_dtype=torch.bfloat16: CPU parameters only (the fused "
                                 f"update has no {', '.join(sorted(devices))} kernel for it)")

    add_param_group = _plain_until_dynamo_loads(torch.optim.Optimizer.add_param_group)
    zero_grad = _plain_until_dynamo_loads(torch.optim.Optimizer.zero_grad)
    state_dict = _plain_until_dynamo_loads(torch.optim.Optimizer.state_dict)
    load_state_dict = _plain_until_dynamo_loads(torch.optim.Optimizer.load_state_dict)

    def _moment_dtype(self, p: torch.Tensor) -> torch.dtype:
        if p.dtype == torch.float32:
            return self.state_dtype
        return torch.float32 if p.dtype == torch.bfloat16 else p.dtype

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        opt_dtype = self._moment_dtype(p)
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=opt_dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=opt_dtype, memory_format=torch.contiguous_format)
        for key in ("exp_avg", "exp_avg_sq"):
            if state[key].dtype != opt_dtype:  # loaded from a state dict in another dtype
                state[key] = state[key].to(opt_dtype).contiguous()
        if p.dtype == torch.bfloat16 and "master_param" not in state:
            state["master_param"] = p.detach().float().contiguous()
        return state

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: float = 1.0):
        """One AdamW update of every parameter with a gradient. grad_scale multiplies each
        gradient as it is read (the gradients themselves are left as they are): gradient
        clipping by the total norm in the same pass, the same float32 products as
        torch.nn.utils.clip_grads_with_norm_ followed by the step."""
        grad_scale = float(grad_scale)
        if not (0.0 <= grad_scale < float("inf")):
            raise ValueError(f"grad_scale: expected a finite non-negative value, got {grad_scale}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            # Parameters of one group normally share a step count; group by (dtype, step) anyway
            # so that a partially loaded state stays exact.
            buckets: dict[tuple, list] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdamW does not support sparse gradients")
                if not p.is_contiguous():
                    raise RuntimeError("FusedAdamW: expected contiguous parameters")
                state = self._init_state(p)
                state["step"] += 1
                buckets[(p.dtype, int(state["step"].item()))].append((p, state))
            for (dtype, step), items in buckets.items():
                params = [p for p, _ in items]
                grads = [p.grad.contiguous() for p in params]
                exp_avgs = [s["exp_avg"] for _, s in items]
                exp_avg_sqs = [s["exp_avg_sq"] for _, s in items]
                if dtype == torch.bfloat16:
                    masters = [s["master_param"] for _, s in items]
                    grads = [g.to(torch.bfloat16) for g in grads]
                    torch.ops.ryzen_llm.adamw_master_step_(
                        params, masters, grads, exp_avgs, exp_avg_sqs, *hyper, step, grad_scale
                    )
                else:
                    torch.ops.ryzen_llm.adamw_step_(
                        params, grads, exp_avgs, exp_avg_sqs, *hyper, step, grad_scale
                    )
                # The ops write the parameters in place without autograd seeing it: move their
                # version counters as an in-place torch op would, so that anything keyed on
                # them (autograd's saved-tensor check, the int8 weight codes of
                # ryzen_llm.ops.linear) knows the values changed.
                torch.autograd.graph.increment_version(params)
        return loss


# The reference is torch.optim.AdamW itself: FusedAdamW takes its constructor's arguments.
SPECS = (OpSpec("adamw", 3, FusedAdamW, torch.optim.AdamW,
                "multi-tensor AdamW: one pass over each parameter, its gradient and moments, "
                "with the gradient clipping factor applied in the same pass"),)
