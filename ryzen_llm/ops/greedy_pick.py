"""The engine's token choice in one op: the Python face of torch.ops.ryzen_llm.greedy_pick.

For each row of a decode step's logits (B, V): the greedy token (the first argmax, as
torch.argmax), its log-probability (log_softmax's value there) and the row's log-sum-exp, from
which a sampled token's log-probability is x[token] - lse. One pass over the logits instead of
log_softmax, argmax and gather (reference.greedy_pick). Inference only (no autograd)."""
from __future__ import annotations

import torch

from ryzen_llm.ops._extension import extension_loaded
from ryzen_llm.ops import reference
from ryzen_llm.ops._spec import OpSpec

_LIB = "ryzen_llm"

if extension_loaded():

    @torch.library.register_fake(f"{_LIB}::greedy_pick")
    def _(logits):
        B = logits.shape[0]
        return (logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B,)),
                logits.new_empty((B,)))


def greedy_pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (B,) int64, logprobs (B,) float32, logsumexp (B,) float32) of logits (B, V)
    float32; see reference.greedy_pick."""
    return torch.ops.ryzen_llm.greedy_pick(logits)


SPECS = (OpSpec("greedy_pick", 2, greedy_pick, reference.greedy_pick,
                "per row of logits: the greedy token, its log-probability, the log-sum-exp",
                inference_only=True),)
