"""The trainer: `python -m ryzen_llm.train`.

Trains the baseline (level 0, plain PyTorch fp32) and then the optimized run (the configured
kernel level) with the same seed, the same initial weights and exactly the same batches, and
writes runs/<name>/report.json and a loss-curve PNG comparing them. Each run executes in its own
process, so that its peak memory is its own; `--only baseline|optimized` runs one in-process.

    python -m ryzen_llm.train                       # the full preset on the built-in corpus
    python -m ryzen_llm.train --preset quick
    python -m ryzen_llm.train --preset smoke training.epochs=1
    python -m ryzen_llm.train --resume runs/full-20261126-101500
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ryzen_llm.checkpoint import CheckpointError, load_checkpoint, restore_rng, save_checkpoint
from ryzen_llm.config import PRESETS, Config, ConfigError, config_from_dict, load_config
from ryzen_llm.distributed import init_from_env
from ryzen_llm.data import BatchSampler, PreparedData, eval_batches, prepare_data
from ryzen_llm.heap import (
    cpu_block_cache_stats, disable_cpu_block_cache, enable_cpu_block_cache, release_free_heap,
)
from ryzen_llm.memory_trace import mark
from ryzen_llm.model import ScaledTransformerModel
from ryzen_llm.ops.dispatch import LEVELS
from ryzen_llm.ops._extension import extension_loaded
from ryzen_llm.train_step import NonFiniteError, TrainStep, resolve_device, warmup_cosine

mark("imports")

RUNS = ("baseline", "optimized")
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


def run_level(config: Config, which: str) -> int:
    return 0 if which == "baseline" else config.optimization.kernel_level


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _load_data(config: Config, progress: bool, build: bool = True) -> PreparedData | None:
    return prepare_data(
        config.data.source,
        vocab_size=config.model.vocab_size,
        seq_len=config.model.max_seq_len,
        cache_dir=config.data.cache_dir,
        max_bytes=config.data.max_bytes,
        val_fraction=config.data.val_fraction,
        seed=config.training.seed,
        progress=progress,
        build=build,
    )


def _build_data_child(config_dict: dict, progress: bool) -> None:
    try:
        _load_data(config_from_dict(config_dict), progress)
    except ValueError:
        pass  # the parent loads the entry again and reports the error itself
    except KeyboardInterrupt:
        sys.exit(130)


def _load_data_building_elsewhere(config: Config, progress: bool) -> PreparedData:
    """The prepared data, with a missing token cache built in a child process.

    Training the tokenizer and encoding the corpus take more memory than a training run's
    steps (docs/memory.md). Linux carries a process's peak resident size into every process it starts (ru_maxrss
    survives fork + exec), so building the cache in this process would make that peak the floor
    of both runs' reported peak memory."""
    data = _load_data(config, progress, build=False)
    if data is None:
        code = _spawn_and_wait(_build_data_child, (config.to_dict(), progress))
        if code != 0:
            raise RuntimeError(f"data preparation failed (exit code {code}); see above")
        # A ValueError in the child (the corpus is too short, ...) is raised here again.
        data = _load_data(config, progress)
    return data


def _prune_epoch_checkpoints(ckpt_dir: Path, keep: int) -> None:
    epochs = sorted(p for p in ckpt_dir.glob("epoch-*") if p.is_dir())
    for old in epochs[: max(0, len(epochs) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


class _Run:
    """One run (baseline or optimized) in this process: its model, TrainStep, batches and the
    state that checkpoints carry (steps, losses, epochs, timings)."""

    def __init__(self, config: Config, which: str, run_dir: Path, data: PreparedData | None,
                 progress: bool):
        tc, mc = config.training, config.model
        self.config, self.which, self.tc = config, which, tc
        self.rank, self.world = (
            (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1))
        global_batch = tc.batch_size * tc.gradient_accumulation_steps
        if global_batch % self.world:
            raise ValueError(
                f"training.batch_size * gradient_accumulation_steps = {global_batch} is not "
                f"divisible by the world size {self.world}"
            )
        self.progress = progress and self.rank == 0
        self.level = run_level(config, which)
        self.out_dir = run_dir / which
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tc.num_threads > 0:
            torch.set_num_threads(tc.num_threads)
        data = data or _load_data(config, self.progress)
        mark(f"{which}: data loaded")
        self.tokenizer_file = run_dir / "tokenizer.json"
        if data.tokenizer is not None and not self.tokenizer_file.exists():
            data.tokenizer.save(self.tokenizer_file)
        self._build_model()
        self.state: dict[str, Any] = {
            "step": 0, "step_losses": [], "grad_norms": [], "epochs": [], "train_time_s": 0.0,
            "tokens": 0, "best_val_loss": None, "nonfinite": None,
        }
        mark(f"{which}: model and optimizer built")
        self._resume()
        # Each rank draws its rows of the same global batch (global_batch / world rows per rank).
        self.sampler = BatchSampler(data.train_tokens, global_batch // self.world, mc.max_seq_len,
                                    tc.seed)
        self.val = eval_batches(data.val_tokens, tc.batch_size, mc.max_seq_len,
                                config.data.eval_batches)
        self.tokens_per_step = global_batch * mc.max_seq_len
        self.config_dict = config.to_dict()

    def _build_model(self) -> None:
        tc = self.tc
        self.device = resolve_device(tc.device)
        release_free_heap()  # what loading the data freed
        torch.manual_seed(tc.seed)  # identical initial weights in both runs (drawn on the CPU)
        self.model = ScaledTransformerModel(self.config.model).to(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        schedule = warmup_cosine(tc.learning_rate, tc.warmup_steps, tc.total_steps,
                                 tc.min_lr_ratio)
        # Compression (activations; gradients across processes) is part of the optimized run at
        # level 3; compression_ratio 0 turns it off.
        optimized = self.which == "optimized" and self.level >= 3
        self.ratio = self.config.optimization.compression_ratio if optimized else 0.0
        self.adamw_state_dtype = self._adamw_state_dtype()
        if self.level >= 4 and self.device.type == "cpu" and extension_loaded():
            from ryzen_llm.ops.linear import set_int8_gemm
            set_int8_gemm(self.config.optimization.int8_gemm)
        self.step = TrainStep(
            self.model, level=self.level, lr=tc.learning_rate, weight_decay=tc.weight_decay,
            max_grad_norm=tc.max_grad_norm, betas=(tc.beta1, tc.beta2), eps=tc.adam_eps,
            grad_accum_steps=tc.gradient_accumulation_steps, lr_schedule=schedule,
            compression_ratio=self.ratio, distributed=self.world > 1,
            adamw_state_dtype=getattr(torch, self.adamw_state_dtype),
            # The pages a micro-batch freed, handed back before the next one takes its peak
            # (docs/memory.md): under 1 ms a call.
            micro_batch_end=release_free_heap if self.device.type == "cpu" else None,
        )

    def _adamw_state_dtype(self) -> str:
        """optimization.adamw_state_dtype for this run. The baseline keeps torch.optim.AdamW's
        float32; null is bfloat16 where the optimized run's fused AdamW runs on the CPU."""
        if self.which != "optimized":
            return "float32"
        wanted = self.config.optimization.adamw_state_dtype
        if wanted is None:
            fused_on_cpu = self.level >= 3 and self.device.type == "cpu" and extension_loaded()
            return "bfloat16" if fused_on_cpu else "float32"
        return wanted  # bfloat16 where it cannot run: TrainStep or FusedAdamW says why

    def _resume(self) -> None:
        last = self.ckpt_dir / "last"
        if not last.exists():
            return
        ckpt = load_checkpoint(last)
        self.model.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state is not None:
            self.step.optimizer.load_state_dict(ckpt.optimizer_state)
        self.state.update({k: v for k, v in ckpt.trainer_state.items() if k in self.state})
        self.step.step_count = self.state["step"]
        restore_rng(ckpt.trainer_state)
        print(f"[{self.which}] resumed from {last} at step {self.state['step']}")

    def checkpoint(self, name: str) -> Path | None:
        if self.rank != 0:
            return None
        trainer_state = {**self.state, "which": self.which, "level": self.level}
        return save_checkpoint(
            self.ckpt_dir / name, self.model, self.config_dict, self.step.optimizer,
            trainer_state, self.tokenizer_file if self.tokenizer_file.exists() else None,
        )

    def train(self, max_steps: int | None) -> bool:
        """Steps until the run is done, max_steps were taken (a checkpoint is saved), a loss
        was not finite, or Ctrl-C (a checkpoint is saved). Returns whether it was interrupted."""
        from tqdm import tqdm

        bar = tqdm(
            total=self.tc.total_steps, initial=self.state["step"],
            desc=f"{self.which} (level {self.level})", unit="step",
            disable=not self.progress, dynamic_ncols=True,
        )
        interrupted = False
        previous_handler = None
        # The steps repeat their allocation sizes: see ryzen_llm/heap.py. Both runs use it, so
        # that their speeds compare kernels, not allocators.
        block_cache = enable_cpu_block_cache()
        self.epoch_start_time, self.epoch_train_time = time.perf_counter(), 0.0
        try:
            interrupted = self._steps(bar, max_steps)
        except KeyboardInterrupt:
            # A second Ctrl-C (or the parent forwarding the first) must not abort the save below.
            previous_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
            interrupted = True
            bar.write(f"[{self.which}] interrupted: saving a checkpoint at step {self.state['step']}")
        finally:
            bar.close()
            self.block_cache_peak = cpu_block_cache_stats()["peak_held"] if block_cache else None
            disable_cpu_block_cache()
        if interrupted and self.state["nonfinite"] is None:
            self.checkpoint("last")
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        return interrupted

    def _steps(self, bar, max_steps: int | None) -> bool:
        """The step loop; True when it stopped at max_steps."""
        state, steps_this_call = self.state, 0
        while state["step"] < self.tc.total_steps:
            if max_steps is not None and steps_this_call >= max_steps:
                return True
            idx, targets = self.sampler.batch(state["step"], self.rank, self.world)
            t0 = time.perf_counter()
            try:
                loss = self.step(idx, targets)
            except NonFiniteError as exc:
                state["nonfinite"] = str(exc)
                print(f"\n[{self.which}] stopped: {exc}. The last good checkpoint is kept in "
                      f"{self.ckpt_dir}.")
                return False
            dt = time.perf_counter() - t0
            self.epoch_train_time += dt
            state["train_time_s"] += dt
            state["tokens"] += self.tokens_per_step
            state["step_losses"].append(loss)
            state["grad_norms"].append(self.step.last_grad_norm)
            state["step"] += 1
            steps_this_call += 1
            release_free_heap()
            mark(f"{self.which}: step {state['step']}")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self.tokens_per_step / dt:,.0f}")
            if state["step"] % self.tc.steps_per_epoch == 0:
                self._end_epoch(bar)
        return False

    def _end_epoch(self, bar) -> None:
        """Validation loss, the epoch's record and line, and the epoch/best/last checkpoints."""
        state, tc, which = self.state, self.tc, self.which
        epoch = state["step"] // tc.steps_per_epoch
        val_loss = self.step.evaluate(self.val)
        mark(f"{which}: evaluated")
        epoch_losses = state["step_losses"][-tc.steps_per_epoch:]
        record = {
            "epoch": epoch, "step": state["step"],
            "train_loss": sum(epoch_losses) / len(epoch_losses), "val_loss": val_loss,
            "epoch_time_s": time.perf_counter() - self.epoch_start_time,
            "train_time_s": self.epoch_train_time,
            "tokens_per_s": (self.tokens_per_step * len(epoch_losses)
                             / max(self.epoch_train_time, 1e-9)),
            "grad_norm": self.step.last_grad_norm,
        }
        state["epochs"].append(record)
        bar.write(
            f"[{which}] epoch {epoch}/{tc.epochs}: train {record['train_loss']:.4f}  "
            f"val {val_loss:.4f}  {record['tokens_per_s']:,.0f} tok/s  "
            f"grad norm {record['grad_norm']:.3f}  ({record['epoch_time_s']:.1f} s)"
        )
        self.checkpoint(f"epoch-{epoch:03d}")
        if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
            state["best_val_loss"] = val_loss
            self.checkpoint("best")
        self.checkpoint("last")
        if self.rank == 0:
            _prune_epoch_checkpoints(self.ckpt_dir, tc.keep_checkpoints)
        release_free_heap()  # what evaluating and saving freed, before the next step's peak
        mark(f"{which}: checkpoints saved")
        self.epoch_start_time, self.epoch_train_time = time.perf_counter(), 0.0

    def metrics(self, interrupted: bool) -> dict[str, Any]:
        state, step = self.state, self.step
        total = self.tc.total_steps
        return {
            "which": self.which,
            "level": self.level,
            "device": str(self.device),
            "bf16_autocast": step.bf16,
            "adamw_state_dtype": self.adamw_state_dtype,
            "cuda_graph": step.graph_status,
            "completed": state["step"] >= total and state["nonfinite"] is None,
            "interrupted": interrupted,
            "nonfinite": state["nonfinite"],
            "steps": state["step"],
            "total_steps": total,
            "tokens": state["tokens"],
            "train_time_s": state["train_time_s"],
            "tokens_per_s": (state["tokens"] / state["train_time_s"]
                             if state["train_time_s"] else None),
            "step_losses": state["step_losses"],
            "grad_norms": state["grad_norms"],
            "epochs": state["epochs"],
            "final_val_loss": state["epochs"][-1]["val_loss"] if state["epochs"] else None,
            "best_val_loss": state["best_val_loss"],
            "memory": self._memory(),
            "ops": step.kernels.summary(),
            "int8_gemm": self._int8_gemm(),
            "world_size": self.world,
            "compression": {
                "ratio": self.ratio,
                "activation_bits": step.compressor.bits if step.compressor else None,
                "gradient_wire_bytes": (step.grad_compression.wire_bytes
                                        if step.grad_compression else None),
                "gradient_fp32_wire_bytes": (step.grad_compression.fp32_wire_bytes
                                             if step.grad_compression else None),
            },
            "checkpoints": sorted(p.name for p in self.ckpt_dir.iterdir()
                                  if not p.name.startswith(".")),
        }

    def _int8_gemm(self) -> dict[str, Any] | None:
        """optimization.int8_gemm and which int8 GEMM ran per shape (level 4's CPU kernels), or
        None where none ran."""
        calls = self.step.kernels.summary().get("linear", {}).get("calls", {})
        if not calls.get("fused") or self.device.type != "cpu":
            return None
        from ryzen_llm.ops.linear import int8_gemm_choices
        return {"mode": self.config.optimization.int8_gemm, "shapes": int8_gemm_choices()}

    def _memory(self) -> dict[str, Any]:
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        opt_bytes = sum(
            t.numel() * t.element_size()
            for s in self.step.optimizer.state.values() for t in s.values()
            if isinstance(t, torch.Tensor)
        )
        saved = self.step.saved_activation_bytes or 0
        device = self.device
        return {
            "parameters": params,
            "gradients": params,
            "optimizer_state": opt_bytes,
            "saved_activations_per_micro_batch": saved,
            "tensor_total": 2 * params + opt_bytes + saved,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            # Most bytes the CPU block cache held at once, in use and cached (None: not used).
            "cpu_block_cache_peak": self.block_cache_peak,
            "peak_cuda_allocated": (
                torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            ),
        }


def train_run(
    config: Config,
    which: str,
    run_dir: Path,
    data: PreparedData | None = None,
    progress: bool = True,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Trains one run (baseline or optimized) in this process, resuming from
    run_dir/<which>/checkpoints/last when it exists. Returns and writes its metrics.

    Under torchrun (a process group is initialised) the model is wrapped in
    DistributedDataParallel, each rank trains on its share of every global batch, and rank 0
    alone writes checkpoints and metrics."""
    run = _Run(config, which, run_dir, data, progress)
    interrupted = run.train(max_steps)
    metrics = run.metrics(interrupted)
    if run.rank == 0:
        _write_json(run.out_dir / METRICS_FILE, metrics)
    mark(f"{which}: metrics written")
    return metrics


def _child(config_dict: dict, which: str, run_dir: str, progress: bool, max_steps: int | None):
    try:
        train_run(config_from_dict(config_dict), which, Path(run_dir), None, progress, max_steps)
    except KeyboardInterrupt:
        sys.exit(130)


def _spawn_and_wait(target, args: tuple) -> int:
    """Runs target(*args) in a fresh process; returns its exit code. Ctrl-C is passed on."""
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=target, args=args)
    proc.start()
    try:
        proc.join()
    except KeyboardInterrupt:
        # A terminal's Ctrl-C reaches the child too; a SIGINT sent to this process alone does
        # not, so pass it on. A training child saves a checkpoint and exits.
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGINT)
        proc.join()
        raise
    if proc.exitcode == 130 or proc.exitcode == -signal.SIGINT:
        raise KeyboardInterrupt
    return proc.exitcode


def _run_in_child(config: Config, which: str, run_dir: Path, progress: bool, max_steps):
    """Runs train_run in a fresh process so the run's peak memory is its own."""
    mark(f"main: starting the {which} run")
    code = _spawn_and_wait(_child, (config.to_dict(), which, str(run_dir), progress, max_steps))
    if code != 0:
        raise RuntimeError(f"the {which} run failed (exit code {code}); see above")
    return json.loads((run_dir / which / METRICS_FILE).read_text())


def _new_run_dir(config: Config, name: str | None) -> Path:
    base = Path(config.output_dir)
    if name is None:
        name = f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = base / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"run folder {str(run_dir)!r} already exists: continue it with --resume {run_dir} "
            "or choose another --name (nothing was overwritten)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ryzen_llm.train",
        description="Train the baseline and the optimized model side by side and compare them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: key=value pairs such as training.epochs=2 optimization.kernel_level=2",
    )
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    p.add_argument("--config", help="YAML file (keys as in configs/scaled_model_training_config.yaml)")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="smoke: seconds, tiny model; quick: minutes, full model; full: the seed "
                        "(default); long: ~15 minutes, the optimized run only")
    p.add_argument("--data", help="corpus: 'stdlib' (default), 'synthetic', a text file, folder or glob")
    p.add_argument("--only", choices=RUNS, help="train only one of the two runs, in this process "
                   "(default: the config's `runs`)")
    p.add_argument("--level", type=int, choices=LEVELS, help="kernel level of the optimized run")
    p.add_argument("--name", help="run folder name under output_dir (default: preset-timestamp)")
    p.add_argument("--output-dir", help="where run folders go (default: runs)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run folder")
    p.add_argument("--max-steps", type=int, help="stop each run after this many optimizer steps "
                   "in this invocation (a checkpoint is saved; --resume continues)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _start(args: argparse.Namespace, rank: int, world: int) -> tuple[Config, str | None, Path]:
    """(config, the one run to train or None for both, run folder): from --resume's folder, or
    from the preset, the YAML file and the overrides (rank 0 makes the folder)."""
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no {CONFIG_FILE} there; not a run folder")
        if args.config or args.preset or args.overrides or args.data or args.level is not None:
            raise ConfigError("--resume continues a run with its saved config; "
                              "drop --config/--preset/--data/--level/overrides")
        saved = json.loads((run_dir / CONFIG_FILE).read_text())
        return config_from_dict(saved["config"]), saved.get("only"), run_dir
    extra = list(args.overrides)
    if args.data:
        extra.append(f"data.source={args.data}")
    if args.level is not None:
        extra.append(f"optimization.kernel_level={args.level}")
    if args.output_dir:
        extra.append(f"output_dir={args.output_dir}")
    config = load_config(args.config, args.preset, extra)
    only = args.only or (config.runs if config.runs != "both" else None)
    run_dir = None
    if rank == 0:
        run_dir = _new_run_dir(config, args.name)
        _write_json(run_dir / CONFIG_FILE, {"config": config.to_dict(), "only": only})
    if world > 1:  # every rank uses rank 0's folder (its name carries a timestamp)
        shared = [str(run_dir) if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    return config, only, run_dir


def _train_runs(config: Config, only: str | None, run_dir: Path, data: PreparedData,
                args: argparse.Namespace, progress: bool, world: int) -> dict[str, dict] | int:
    """Trains the runs not yet complete; their metrics, or an exit status when stopped early."""
    metrics: dict[str, dict] = {}
    for which in [only] if only else list(RUNS):
        done = run_dir / which / METRICS_FILE
        if done.is_file():
            previous = json.loads(done.read_text())
            if previous.get("completed"):
                print(f"[{which}] already complete; reusing its metrics")
                metrics[which] = previous
                continue
        if only or world > 1:  # under torchrun every run is in-process
            metrics[which] = train_run(config, which, run_dir, data, progress, args.max_steps)
        else:
            metrics[which] = _run_in_child(config, which, run_dir, progress, args.max_steps)
        if metrics[which]["interrupted"]:
            print(f"stopped early; continue with: python -m ryzen_llm.train --resume {run_dir}")
            return 0 if args.max_steps is not None else 130
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world = init_from_env()  # (0, 1) unless started by torchrun with several processes
    progress = not args.no_progress and rank == 0
    try:
        config, only, run_dir = _start(args, rank, world)
        if world > 1 and rank != 0:
            dist.barrier()  # rank 0 fills the token cache first; the others then read it
        data = _load_data_building_elsewhere(config, progress)  # fills the cache before the runs
        if world > 1 and rank == 0:
            dist.barrier()
        mark("main: data loaded")
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from ryzen_llm.report import build_report, print_report, write_report

    if rank == 0:
        print(f"run folder: {run_dir}" + (f" ({world} processes)" if world > 1 else ""))
        print(f"corpus: {data.source} ({data.n_files} files, {data.n_bytes / 1e6:.1f} MB) -> "
              f"{len(data.train_tokens):,} train / {len(data.val_tokens):,} validation tokens")
    try:
        metrics = _train_runs(config, only, run_dir, data, args, progress, world)
    except KeyboardInterrupt:
        print(f"\ninterrupted; checkpoints are saved. Continue with: "
              f"python -m ryzen_llm.train --resume {run_dir}")
        return 130
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if isinstance(metrics, int):
        return metrics
    if world > 1:
        from ryzen_llm.distributed import shutdown

        shutdown()  # every rank is done with the group: tear it down before the interpreter exits
    if rank != 0:
        return 0
    report = build_report(config, metrics, run_dir)
    write_report(report, run_dir)
    mark("main: report written")
    print_report(report)
    failed = any(m.get("nonfinite") for m in metrics.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
