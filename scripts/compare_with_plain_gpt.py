"""Train the library's model and a plain torch.nn GPT of the same shape on the same batches.

    python scripts/compare_with_plain_gpt.py [--steps 80] [--level 3] [--variants current,plain]
    python scripts/compare_with_plain_gpt.py --shape test --level 0 --steps 100 --seeds 0,1,2 \
        --variants current,xavier,plain      # the learning test's shape, over three seeds

The plain GPT (tests/test_learning.py: learned positions, SDPA, PyTorch's default inits) is the
yardstick for how fast the model should learn. Variants of the library's model change only its
initial token embedding or the amplitude of its sinusoidal table, to measure what the embedding
scale does: `current` (the model as it is), `xavier` (token embedding Xavier-uniform, as before
the fix), `xavier_x_sqrtd` (that, times sqrt(d_model)), `pos0.5` and `pos0.25` (the positional
table scaled down). Prints the loss every 10 steps, the mean of the last 10 and a validation loss.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ryzen_llm import ModelConfig, ScaledTransformerModel, TrainStep  # noqa: E402
from ryzen_llm.data import BatchSampler, eval_batches, prepare_data  # noqa: E402
from tests.test_learning import SHAPE, PlainGPT  # noqa: E402

VARIANTS = ("current", "xavier", "xavier_x_sqrtd", "pos0.5", "pos0.25", "plain")


def plain_step(model: nn.Module, lr: float):
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.01},
                             {"params": others, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))

    def step(idx, targets):
        opt.zero_grad()
        loss = model(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    def evaluate(batches):
        with torch.no_grad():
            return sum(model(i, t).item() for i, t in batches) / len(batches)

    return step, evaluate


def library_step(config: ModelConfig, variant: str, level: int, lr: float):
    model = ScaledTransformerModel(config)
    with torch.no_grad():
        if variant.startswith("xavier"):
            nn.init.xavier_uniform_(model.tok_emb.weight)
        if variant == "xavier_x_sqrtd":
            model.tok_emb.weight.mul_(math.sqrt(config.d_model))
        if variant.startswith("pos"):
            model.pos_emb.mul_(float(variant[3:]))
    step = TrainStep(model, level=level, lr=lr)
    return step, step.evaluate


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--level", type=int, default=3, help="the library model's kernel level")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-bytes", type=int, default=4_000_000, help="of the stdlib corpus")
    p.add_argument("--variants", default="current,xavier,xavier_x_sqrtd,pos0.5,pos0.25,plain")
    p.add_argument("--shape", choices=("seed", "test"), default="seed",
                   help="seed: the seed's model on --max-bytes of stdlib, sampler seed 42; test: "
                        "tests/test_learning.py's small model on 1 MB, sampler seed = --seeds")
    p.add_argument("--seeds", default="0", help="comma-separated torch seeds (and, with --shape "
                   "test, sampler seeds)")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    config, max_bytes = (ModelConfig(), args.max_bytes) if args.shape == "seed" else (SHAPE, 1_000_000)
    data = prepare_data("stdlib", config.vocab_size, config.max_seq_len, max_bytes=max_bytes,
                        progress=False)
    val = eval_batches(data.val_tokens, 16, config.max_seq_len, 4)
    print(f"{args.steps} steps of 16 x {config.max_seq_len} tokens, lr {args.lr}, "
          f"library at level {args.level}; loss every 10 steps")
    for seed in (int(s) for s in args.seeds.split(",")):
        sampler = BatchSampler(data.train_tokens, 16, config.max_seq_len,
                               seed=42 if args.shape == "seed" else seed)
        batches = [sampler.batch(i) for i in range(args.steps)]
        for variant in variants:
            torch.manual_seed(seed)
            if variant == "plain":
                step, evaluate = plain_step(PlainGPT(config), args.lr)
            else:
                step, evaluate = library_step(config, variant, args.level, args.lr)
            start = time.perf_counter()
            losses = [step(idx, targets) for idx, targets in batches]
            val_loss = evaluate(val)
            curve = " ".join(f"{losses[i]:.2f}" for i in range(0, args.steps, 10))
            print(f"seed {seed} {variant:15s} {curve}  last 10: {sum(losses[-10:]) / 10:.3f}  "
                  f"val {val_loss:.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
