"""How the next token of each live row is chosen: greedy through the greedy_pick op, or drawn
with temperature / top-k / top-p from the request's own seeded generator.

The log-prob reported with a token is always under the model (temperature 1), whatever the
sampling settings, so that candidates of one request compare by mean log-prob.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ryzen_llm.engine.request import Candidate, Request

# kernels.greedy_pick: logits (B, V) -> (first argmax, its log-prob, log-sum-exp), each (B,)
GreedyPick = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def choose_tokens(logits: torch.Tensor, live: Sequence[tuple[Request, Candidate]],
                  greedy_pick: GreedyPick) -> tuple[list[int], list[float]]:
    """Next token and its log-prob (under the model, temperature 1) for each row of logits
    (rows, V); live[i] is the (request, candidate) decoding in row i."""
    logits = logits.float()
    # greedy rows: the argmax and its log-prob; sampled rows are overwritten below
    chosen, logps, lse = greedy_pick(logits)
    sampled = [i for i, (req, _) in enumerate(live) if not req.params.greedy]
    # Each request draws from its own generator in candidate order, whatever rows the
    # candidates occupy after other sequences left: a seed gives the same output in any batch.
    sampled.sort(key=lambda i: (live[i][0].id, live[i][1].index))
    if sampled:
        _sample_rows(logits, live, sampled, chosen)
        idx = torch.tensor(sampled)
        logps[idx] = logits[idx, chosen[idx]] - lse[idx]  # log_softmax at the sampled token
    return chosen.tolist(), logps.tolist()


def _sample_rows(logits: torch.Tensor, live: Sequence[tuple[Request, Candidate]],
                 sampled: list[int], chosen: torch.Tensor) -> None:
    """Draws chosen[i] for each row i in sampled (in this order), after temperature, top-k
    and top-p."""
    idx = torch.tensor(sampled)
    sub = logits[idx]
    temps = torch.tensor([live[i][0].params.temperature for i in sampled])[:, None]
    sorted_logits, order = torch.sort(sub / temps, dim=-1, descending=True)
    ranks = torch.arange(sub.shape[-1])[None, :]
    ks = torch.tensor([live[i][0].params.top_k or sub.shape[-1] for i in sampled])
    sorted_logits = sorted_logits.masked_fill(ranks >= ks[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    top_ps = torch.tensor([live[i][0].params.top_p for i in sampled])[:, None]
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_ps, 0.0)
    for j, i in enumerate(sampled):
        pick = torch.multinomial(probs[j], 1, generator=live[i][0].generator)
        chosen[i] = order[j, pick[0]]
