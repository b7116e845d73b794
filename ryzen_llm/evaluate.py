"""Validation loss and perplexity of a checkpoint, through the kernels the engine generates with.

    python -m ryzen_llm.evaluate --checkpoint runs/long/optimized/checkpoints/best --weights int8

The model is loaded as the engine loads it (Engine.from_checkpoint: the level's kernels, the
linear weights cast to --weights), and each window of max_seq_len tokens is run teacher-forced
as one prefill (forward_with_cache(every_position=True): the same decode_linear, attention and
LayerNorm kernels, and the same bits, as the engine's prefill), so the loss measures the format
that generation serves. The windows are the non-overlapping ones of the checkpoint's own
validation split (its data section: the same files, encoded with the checkpoint's tokenizer),
or of --data. loss = mean next-token cross-entropy over every predicted token, perplexity =
exp(loss). --json prints one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ryzen_llm.checkpoint import CheckpointError
from ryzen_llm.config import WEIGHT_FORMATS, ConfigError
from ryzen_llm.data import encode_corpus, eval_batches

# the loader, data and kernels raise these with a message naming the problem: exit 2, no traceback
USER_ERRORS = (CheckpointError, ConfigError, FileNotFoundError, ValueError)


@dataclass
class Evaluation:
    loss: float  # mean next-token cross-entropy (nats)
    perplexity: float  # exp(loss)
    tokens: int  # predicted tokens counted
    windows: int  # sequences of max_seq_len tokens
    weights: str  # the linear weights' format
    level: int
    checkpoint: str
    data: str  # "validation split of <source>" or the --data path
    seconds: float


def load_model(checkpoint: str | Path, weights: str | None, level: int | None):
    """An Engine of the checkpoint (Engine.from_checkpoint, its thread never started), whose
    model holds the linear weights in the format generation would use; weights None and level
    None take the checkpoint's defaults."""
    from ryzen_llm.engine import Engine

    path = Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a folder")
    if weights is not None and weights not in WEIGHT_FORMATS:
        raise ValueError(f"--weights: expected one of {', '.join(WEIGHT_FORMATS)}, "
                         f"got {weights!r}")
    return Engine.from_checkpoint(path, weights=weights, level=level, warmup_steps=0,
                                  max_batch_size=1, start=False)


def evaluation_tokens(engine, data: str | None, progress: bool) -> tuple[np.ndarray, str]:
    """(tokens, description): the checkpoint's validation split by default, else all of --data
    (a file, a folder or a glob), encoded with the checkpoint's tokenizer."""
    dc = engine.config.data
    if data is not None:
        return encode_corpus(data, engine.tokenizer, "all", progress=progress), data
    if dc.source == "synthetic":
        raise ValueError("the checkpoint was trained on synthetic data, which has no validation "
                         "text: pass --data")
    tokens = encode_corpus(dc.source, engine.tokenizer, "val", dc.max_bytes, dc.val_fraction,
                           progress)
    return tokens, f"validation split of {dc.source}"


def windows(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None,
            data: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (inputs, targets) (B, seq_len): every non-overlapping window of seq_len + 1
    tokens (eval_batches), or max_batches batches of them spread over the data."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"data {data!r}: {len(tokens)} tokens, fewer than one window of "
                         f"{seq_len + 1} (the model's max_seq_len {seq_len} + 1 target)")
    available = max(1, (len(tokens) - 1) // seq_len // batch_size)
    return eval_batches(tokens, batch_size, seq_len, min(max_batches or available, available))


@torch.inference_mode()
def batch_loss(model, idx: torch.Tensor, targets: torch.Tensor, cache) -> float:
    """Summed next-token cross-entropy (float64) of one batch, teacher-forced as one prefill."""
    logits = model.forward_with_cache(idx, cache.rows(0, idx.shape[0]),
                                      every_position=True)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).double(), targets.flatten(),
                           reduction="sum").item()


def evaluate(checkpoint: str | Path, weights: str | None = None, data: str | None = None,
             level: int | None = None, batch_size: int = 8, max_batches: int | None = None,
             progress: bool = True) -> Evaluation:
    from tqdm.auto import tqdm

    from ryzen_llm.model import KVCache

    if batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ValueError(f"--batch-size and --max-batches: must be >= 1, got {batch_size}, "
                         f"{max_batches}")
    engine = load_model(checkpoint, weights, level)
    model, seq_len = engine.model, engine.model.config.max_seq_len
    tokens, described = evaluation_tokens(engine, data, progress)
    batches = windows(tokens, seq_len, batch_size, max_batches, described)
    cache = KVCache(model.config, batch_size)
    total, counted, t0 = 0.0, 0, time.perf_counter()
    for idx, targets in tqdm(batches, desc=f"evaluate {engine.weights}", unit="batch",
                             file=sys.stderr, disable=not progress):
        total += batch_loss(model, idx, targets, cache)
        counted += targets.numel()
    loss = total / counted
    return Evaluation(loss, math.exp(loss), counted, sum(len(b[0]) for b in batches),
                      engine.weights, engine.level, str(checkpoint), described,
                      time.perf_counter() - t0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ryzen_llm.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder (save_checkpoint)")
    p.add_argument("--weights", default=None,
                   help=f"{' | '.join(WEIGHT_FORMATS)} (default: the level's, bfloat16 at 3)")
    p.add_argument("--data", default=None, help="a text file, folder or glob to evaluate on "
                   "(default: the checkpoint's validation split)")
    p.add_argument("--level", type=int, default=None,
                   help="kernel level (default: the checkpoint's optimization.kernel_level)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default 8)")
    p.add_argument("--max-batches", type=int, default=None,
                   help="at most this many batches, spread over the data (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(args.checkpoint, args.weights, args.data, args.level,
                          args.batch_size, args.max_batches, progress=not args.no_progress)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint {result.checkpoint}, level {result.level}, {result.weights} weights")
    print(f"data: {result.data}: {result.windows} windows, {result.tokens:,} tokens")
    print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.3f}  "
          f"({result.tokens / result.seconds:,.0f} tokens/s)")
    if args.json:
        print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
