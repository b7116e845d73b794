"""Data-parallel training with 2 real processes (gloo on 127.0.0.1): the loss matches one process
with the same global batch, and the int8-compressed all-reduce stays close to it."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ryzen_llm import ModelConfig, ScaledTransformerModel, TrainStep
from ryzen_llm.data import BatchSampler
from ryzen_llm.distributed import shutdown
from ryzen_llm.ops._extension import extension_loaded

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16)
GLOBAL_BATCH, STEPS, WORLD = 8, 8, 2


def tokens():
    return (np.arange(4000) * 7 % 61).astype(np.uint16)  # a learnable periodic stream


def _worker(rank: int, ratio: float, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A file rendezvous: no port to pick in advance that another process could take meanwhile.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank,
                            world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(
            ScaledTransformerModel(TINY), broadcast_buffers=False
        )
        step = TrainStep(model, level=0, lr=3e-3, compression_ratio=ratio)
        sampler = BatchSampler(tokens(), GLOBAL_BATCH // WORLD, TINY.max_seq_len, seed=0)
        losses = [step(*sampler.batch(s, rank, WORLD)) for s in range(STEPS)]
        gc = step.grad_compression
        result = {"losses": losses, "wire_ratio": gc.ratio if gc else None,
                  "wire_bytes": gc.wire_bytes if gc else 0,
                  "fp32_wire_bytes": gc.fp32_wire_bytes if gc else 0}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        del step, model, sampler, gc  # the DDP model and the hook state hold the group
        shutdown()  # neither rank tears gloo down while the other still talks to it
    finally:
        if dist.is_initialized():  # an error above: tear down without waiting for the other
            dist.destroy_process_group()


def run_two_processes(tmp_path, ratio: float) -> list[dict]:
    mp.spawn(_worker, args=(ratio, str(tmp_path)), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def single_process_losses() -> list[float]:
    torch.manual_seed(0)
    step = TrainStep(ScaledTransformerModel(TINY), level=0, lr=3e-3)
    # world_size 1 with the global batch draws the same window starts the 2 ranks share out.
    sampler = BatchSampler(tokens(), GLOBAL_BATCH, TINY.max_seq_len, seed=0)
    return [step(*sampler.batch(s)) for s in range(STEPS)]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    ranks = run_two_processes(tmp_path, ratio=0.0)
    single = single_process_losses()
    assert ranks[0]["losses"] == ranks[1]["losses"]  # each rank reports the global mean
    diff = max(abs(a - b) for a, b in zip(ranks[0]["losses"], single))
    print(f"2 processes vs 1: loss {single[0]:.4f} -> {single[-1]:.4f}, max difference {diff:.2e}")
    assert single[-1] < single[0]
    assert diff < 1e-4


@pytest.mark.skipif(not extension_loaded(), reason="the int8 hook needs the quantize kernel")
def test_int8_gradient_allreduce_stays_close_and_sends_under_0_3_of_fp32(tmp_path):
    ranks = run_two_processes(tmp_path, ratio=0.3)
    single = single_process_losses()
    diff = max(abs(a - b) for a, b in zip(ranks[0]["losses"], single))
    r = ranks[0]
    print(f"int8 all-reduce: final loss {r['losses'][-1]:.4f} vs {single[-1]:.4f} fp32 single, "
          f"max difference {diff:.4f}; {r['wire_bytes']} bytes sent vs {r['fp32_wire_bytes']} "
          f"for fp32 (ratio {r['wire_ratio']:.3f})")
    assert diff < 0.05
    assert r["wire_ratio"] <= 0.3
