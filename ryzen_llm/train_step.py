"""TrainStep: one optimizer step (forward, backward, clipping, update) at an optimization level.

The trainer is built on it and so can users be:

    step = TrainStep(model, level=3, lr=3e-4)
    for idx, targets in batches:
        loss = step(idx, targets)
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ryzen_llm.compression import ActivationCompressor
from ryzen_llm.hardware import has_native_bf16
from ryzen_llm.model import measure_saved_activation_bytes
from ryzen_llm.ops._extension import extension_loaded, has_kernel
from ryzen_llm.ops.adamw import FusedAdamW
from ryzen_llm.ops.dispatch import KernelOptimizer


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN or inf; the update was not applied."""


def warmup_cosine(lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """Linear warmup to lr over warmup_steps, then cosine decay to min_ratio * lr."""

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    return schedule


def resolve_device(name: str) -> torch.device:
    """training.device -> torch.device: "auto" is cuda when available, else cpu; "cuda" without a
    usable GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"training.device={name} but CUDA is unavailable (torch {torch.__version__}, built "
            f"with CUDA {torch.version.cuda}); use training.device=cpu or auto"
        )
    return torch.device(name)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, as in GPT-2: not on biases, LayerNorms or embeddings' norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@dataclass
class _CapturedStep:
    """The forward and backward of every micro-batch of one step, recorded in one CUDA graph:
    static inputs to copy batches into, and the tensors each replay rewrites (the per-micro-batch
    losses, the gradients, their total norm)."""

    graph: torch.cuda.CUDAGraph
    shape: tuple
    idx: torch.Tensor
    targets: torch.Tensor
    losses: torch.Tensor
    grads: list
    norm: torch.Tensor
    calls: Counter  # the kernel-set calls one replay stands for


class StepGraph:
    """The CUDA graph of a TrainStep's forward and backward: small models on a big GPU are
    bound by kernel launches, so the step's micro-batches are captured once (after
    TrainStep.GRAPH_WARMUP_STEPS eager steps of the batch shape, which set up cuBLAS handles,
    autocast and the optimizer's state outside the capture) and replayed. One graph per run,
    for its usual batch shape; other shapes run eagerly. Clipping, the NaN check and AdamW stay
    eager in TrainStep: their learning rate and checks change every step."""

    def __init__(self, step: "TrainStep"):
        self.step = step
        self.enabled = True
        self.status = "on: not captured yet"
        self.captured: _CapturedStep | None = None
        self._eager_steps_by_shape: Counter = Counter()

    def forward_backward(self, idx: torch.Tensor,
                         targets: torch.Tensor) -> tuple[float, float] | None:
        """Forward and backward by replaying the captured graph (capturing it once the batch
        shape has had its warm-up steps). Returns the mean loss and the gradients' total norm,
        or None where this step runs eagerly (warm-up, another batch shape, or a capture that
        failed, which is reported)."""
        shape = (tuple(idx.shape), tuple(targets.shape), idx.dtype, targets.dtype)
        cap = self.captured
        if cap is None:
            self._eager_steps_by_shape[shape] += 1
            if self._eager_steps_by_shape[shape] <= self.step.GRAPH_WARMUP_STEPS:
                return None
            cap = self.capture(idx, targets, shape)
            if cap is None:
                return None
        elif cap.shape != shape:
            return None  # one graph per run, for its usual batch shape; other shapes run eagerly
        cap.idx.copy_(idx, non_blocking=True)
        cap.targets.copy_(targets, non_blocking=True)
        params = self.step._params()
        for p, g in zip(params, cap.grads):  # an eager step in between sets .grad to None
            p.grad = g
        cap.graph.replay()
        self.step.kernels.calls.update(cap.calls)
        values = torch.cat([cap.losses, cap.norm.reshape(1).float()]).tolist()  # the one sync
        losses, norm = values[:-1], values[-1]
        for loss in losses:
            if not math.isfinite(loss):
                raise NonFiniteError(
                    f"step {self.step.step_count}: loss is {loss}; the update was not applied"
                )
        return sum(losses) / len(losses), norm

    def capture(self, idx: torch.Tensor, targets: torch.Tensor, shape: tuple) -> _CapturedStep | None:
        step = self.step
        params = step._params()
        before = Counter(step.kernels.calls)
        static_idx, static_targets = idx.clone(), targets.clone()
        # Gradients start as None so that the captured backward allocates them in the graph's
        # memory pool; every replay then rewrites them in place.
        step.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(step.device)
            with torch.cuda.graph(graph):
                losses = []
                for micro_idx, micro_targets in zip(static_idx.chunk(step.grad_accum_steps),
                                                    static_targets.chunk(step.grad_accum_steps)):
                    loss = step._forward(micro_idx, micro_targets)
                    (loss / step.grad_accum_steps).backward()
                    losses.append(loss.detach().float())
                static_losses = torch.stack(losses)
                grads = [p.grad for p in params]
                norm = torch.nn.utils.get_total_norm([g for g in grads if g is not None])
        except Exception as exc:  # the step still runs, eagerly, and the reason is reported
            self.enabled = False
            self.status = f"off: capture failed ({type(exc).__name__}: {exc})"
            step.kernels.calls = before
            step.optimizer.zero_grad(set_to_none=True)
            warnings.warn(f"level {step.level}: CUDA graph capture failed, the step runs "
                          f"without it: {type(exc).__name__}: {exc}", stacklevel=3)
            return None
        calls = Counter(step.kernels.calls)
        calls.subtract(before)
        step.kernels.calls = before  # capturing ran nothing: replays count
        self.captured = _CapturedStep(graph, shape, static_idx, static_targets, static_losses,
                                      grads, norm, +calls)
        self.status = f"on: batch {list(idx.shape)} captured at step {step.step_count}"
        return self.captured


class TrainStep:
    """Forward, backward, gradient clipping and the AdamW update, with everything the
    optimization level implies (fused ops, fused AdamW and bf16 autocast at level 3; on a GPU,
    level 3 also replays each step's forward and backward as one CUDA graph; level 4 adds the
    int8 GEMMs of ryzen_llm.ops.linear, on the CPU)."""

    # Eager steps of a batch shape before its step is captured: cuBLAS handles, autocast and the
    # optimizer's state are set up outside the capture, as CUDA graphs require.
    GRAPH_WARMUP_STEPS = 2

    def __init__(
        self,
        model: torch.nn.Module,
        level: int = 0,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        max_grad_norm: float | None = 1.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        grad_accum_steps: int = 1,
        lr_schedule: Callable[[int], float] | None = None,
        bf16: bool | None = None,
        kernel_overrides: dict[str, str] | None = None,
        compression_ratio: float = 0.0,
        distributed: bool = False,
        cuda_graph: bool | None = None,
        adamw_state_dtype: torch.dtype = torch.float32,
        micro_batch_end: Callable[[], object] | None = None,
    ):
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps: must be >= 1, got {grad_accum_steps}")
        if distributed and not isinstance(model, DistributedDataParallel):
            # The pos_emb buffer is a constant: nothing to broadcast each step.
            model = DistributedDataParallel(model, broadcast_buffers=False)
        # A DistributedDataParallel model runs its forward through the wrapper (so that gradients
        # are all-reduced); everything else (kernels, parameters, evaluation) uses the module.
        self.ddp = model if isinstance(model, DistributedDataParallel) else None
        model = model.module if self.ddp is not None else model
        self.model = model
        self.level = level
        # Where the model lives is where the step runs: batches are moved there.
        self.device = next(model.parameters()).device
        self.kernels = self._kernels(level, kernel_overrides)
        # bf16 mixed precision is part of level 3 where the device computes bf16 natively
        # (CPUs with AVX512-BF16/AMX, GPUs from Ampere on); elsewhere it would be slower than fp32.
        if bf16 is None:
            native = (torch.cuda.is_bf16_supported() if self.device.type == "cuda"
                      else has_native_bf16())
            bf16 = level >= 3 and native
        self.bf16 = bf16
        self.max_grad_norm = max_grad_norm
        self.grad_accum_steps = grad_accum_steps
        self.lr_schedule = lr_schedule or (lambda step: lr)
        self.optimizer = self._optimizer(parameter_groups(model, weight_decay), lr, betas, eps,
                                         adamw_state_dtype)
        # compression_ratio > 0: saved activations are kept as int8 (ratio >= 0.27) or 4-bit
        # codes, and a multi-process run all-reduces int8 gradients with error feedback.
        self.compression_ratio = compression_ratio
        self.compressor = ActivationCompressor(model, compression_ratio) if compression_ratio > 0 else None
        self.grad_compression = None
        if compression_ratio > 0 and self.ddp is not None and dist.get_world_size() > 1:
            from ryzen_llm.distributed import register_int8_allreduce_hook

            self.grad_compression = register_int8_allreduce_hook(self.ddp)
        self.graph = StepGraph(self) if self._wants_cuda_graph(cuda_graph) else None
        # Called after each eager micro-batch's backward (the trainer hands freed heap pages
        # back there: ryzen_llm.heap.release_free_heap).
        self.micro_batch_end = micro_batch_end
        self.step_count = 0
        self.last_grad_norm = float("nan")
        # Bytes autograd saved for backward in one micro-batch, measured on the first call.
        self.saved_activation_bytes: int | None = None

    def _kernels(self, level: int, overrides: dict[str, str] | None):
        """The level's kernel set, applied to the model. Where this build has no int8 linear
        for the device (a CUDA device with an extension built without the CUDA toolkit, any
        other device), level 4 runs level 3's linear layers, and says so (a warning, and "FELL
        BACK" in the report)."""
        unavailable = None
        if extension_loaded() and not has_kernel("int8_linear_forward", self.device.type):
            unavailable = {"linear": f"no {self.device.type} kernel in this build"}
        return KernelOptimizer(level, overrides, unavailable).apply(self.model).kernels

    def _optimizer(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                   state_dtype: torch.dtype) -> torch.optim.Optimizer:
        """FusedAdamW or torch.optim.AdamW, as the level chose; both take these arguments.
        bfloat16 moments (half the optimizer state's memory) only exist in FusedAdamW."""
        state = {}
        if state_dtype != torch.float32:
            choice = self.kernels.choices["adamw"]
            if choice.impl != "fused":
                raise ValueError(
                    f"adamw_state_dtype={state_dtype}: needs the fused AdamW (level >= 3 "
                    f"with the extension built); this step runs torch.optim.AdamW "
                    f"({choice.reason})"
                )
            state = {"state_dtype": state_dtype}
        return self.kernels.adamw(groups, lr=lr, betas=betas, eps=eps, **state)

    def _wants_cuda_graph(self, cuda_graph: bool | None) -> bool:
        """Small models on a big GPU are bound by kernel launches: from level 3 the forward and
        backward of a step are captured once per run and replayed (clipping and the AdamW
        update stay eager: their NaN check and learning rate change every step). Not with DDP,
        whose all-reduce hooks would be frozen into the graph."""
        if cuda_graph is None:
            return self.level >= 3 and self.device.type == "cuda" and self.ddp is None
        if cuda_graph and (self.device.type != "cuda" or self.ddp is not None):
            raise ValueError(
                "cuda_graph: needs a model on a CUDA device and no DistributedDataParallel "
                f"(device {self.device}, distributed {self.ddp is not None})"
            )
        return cuda_graph

    def autocast(self):
        if self.bf16:
            # No weight-cast cache: each weight is cast once per forward anyway, and the cache
            # would hold every bf16 copy until the forward ends (the compressor lets backward
            # cast the weights again instead of keeping the copies).
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def __call__(self, idx: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer step over idx (B, T), split into grad_accum_steps micro-batches.
        Returns the mean loss."""
        if idx.shape[0] % self.grad_accum_steps:
            raise ValueError(
                f"idx: batch {idx.shape[0]} is not divisible by grad_accum_steps "
                f"{self.grad_accum_steps}"
            )
        self.model.train()
        graph = self.graph if self.cuda_graph else None
        if graph is not None:
            # A replayed graph checks nothing: the batch is checked here, on the host where the
            # trainer's batches are, as the eager forward checks it.
            self.model._check_input(idx, None)
            self.model.check_targets(targets)
        idx = idx.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if graph is not None:
            replayed = graph.forward_backward(idx, targets)
            if replayed is not None:
                mean_loss, graph_norm = replayed
                self._update(graph_norm)
                return mean_loss
            if graph.captured is not None:  # the graph's gradients must not accumulate here
                self.optimizer.zero_grad(set_to_none=True)
        mean_loss = self._forward_backward(idx, targets)
        self._update()
        return mean_loss

    @property
    def cuda_graph(self) -> bool:
        """Whether steps replay a CUDA graph (False after a failed capture)."""
        return self.graph is not None and self.graph.enabled

    @property
    def graph_status(self) -> str:
        return self.graph.status if self.graph is not None else "off"

    def _forward_backward(self, idx: torch.Tensor, targets: torch.Tensor) -> float:
        """Forward and backward of every micro-batch, eagerly; returns the mean loss."""
        total = 0.0
        micro_batches = list(zip(idx.chunk(self.grad_accum_steps), targets.chunk(self.grad_accum_steps)))
        for i, (micro_idx, micro_targets) in enumerate(micro_batches):
            # Gradients are all-reduced once per step, on the last micro-batch's backward.
            sync = self.ddp is None or i == len(micro_batches) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                loss = self._forward(micro_idx, micro_targets)
                loss_value = loss.detach().float()
                if self.ddp is not None:  # the global mean, and every rank stops together
                    dist.all_reduce(loss_value)
                    loss_value /= dist.get_world_size()
                if not torch.isfinite(loss_value):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteError(
                        f"step {self.step_count}: loss is {loss_value.item()}; the update was not applied"
                    )
                (loss / self.grad_accum_steps).backward()
            total += loss_value.item()
            if self.micro_batch_end is not None:
                self.micro_batch_end()
        return total / self.grad_accum_steps

    def _params(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _update(self, graph_norm: float | None = None) -> None:
        """Clipping and the AdamW step (eager in both modes), after a NaN/inf check.
        graph_norm: the gradients' total norm, computed inside the replayed graph."""
        params = self._params()
        graph = graph_norm is not None
        grad_scale = None
        if graph:
            norm = graph_norm  # the clipping is torch's, with the norm the graph computed
            if self.max_grad_norm is not None and self.max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm,
                                                     self.graph.captured.norm)
        elif self.max_grad_norm is not None and self.max_grad_norm > 0:
            if isinstance(self.optimizer, FusedAdamW):
                # torch's clipping factor, applied as the fused step reads each gradient
                # instead of in a pass of its own over every gradient
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                grad_scale = float(torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0))
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        self.last_grad_norm = float(norm)
        if not math.isfinite(self.last_grad_norm):
            if not graph:  # a graph's gradients live in its pool and are rewritten next replay
                self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"step {self.step_count}: gradient norm is {self.last_grad_norm}; "
                "the update was not applied"
            )
        lr = self.lr_schedule(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if grad_scale is None:
            self.optimizer.step()
        else:
            self.optimizer.step(grad_scale=grad_scale)
        self.kernels.count(("adamw", self.kernels.choices["adamw"].impl))
        if not graph:
            self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1

    def _forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch, with the saved activations compressed when asked; the
        saved bytes are measured on the first call."""
        if self.ddp is not None:
            run = lambda: self.ddp(idx, targets=targets)  # noqa: E731
        else:
            run = lambda: self.model.loss(idx, targets)  # noqa: E731
        hooks = self.compressor.pack_fn(idx.numel()) if self.compressor is not None else None
        try:
            with self.autocast():
                if self.saved_activation_bytes is None:
                    self.saved_activation_bytes, loss = measure_saved_activation_bytes(
                        self.model, run, hooks[:2] if hooks else None
                    )
                elif hooks is not None:
                    with torch.autograd.graph.saved_tensors_hooks(hooks[0], hooks[1]):
                        loss = run()
                else:
                    loss = run()
        finally:
            if hooks is not None:
                hooks[2]()
        return loss

    @torch.no_grad()
    def evaluate(self, batches) -> float:
        """Mean loss over (idx, targets) batches, with this step's kernels and precision."""
        was_training = self.model.training
        self.model.eval()
        losses = []
        for idx, targets in batches:
            idx, targets = idx.to(self.device), targets.to(self.device)
            with self.autocast():
                losses.append(self.model.loss(idx, targets).item())
        self.model.train(was_training)
        return sum(losses) / max(1, len(losses))

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.optimizer.load_state_dict(state["optimizer"])
