"""The response cache: deterministic results (greedy, or a fixed seed) kept for a while, keyed by
everything that decides the output."""
from __future__ import annotations

import copy
import hashlib
import json

from cachetools import TTLCache

from ryzen_llm.engine import SamplingParams


def cache_key(model_sha256: str, level: int, prompt: str, params: SamplingParams) -> str:
    """sha256 over the weights' sha256, the kernel level, the prompt and every sampling
    parameter: a change to any of them is another entry."""
    fields = json.dumps([model_sha256, level, prompt, sorted(vars(params).items())],
                        default=list)
    return hashlib.sha256(fields.encode()).hexdigest()


class ResponseCache:
    """Engine results by cache_key, for ttl_s seconds, at most maxsize of them (least recently
    used out first). Results go in and come out as deep copies: a caller may change its copy."""

    def __init__(self, maxsize: int = 4096, ttl_s: float = 300.0):
        self.entries: TTLCache = TTLCache(maxsize=maxsize, ttl=ttl_s)

    def get(self, key: str) -> dict | None:
        result = self.entries.get(key)
        return None if result is None else copy.deepcopy(result)

    def put(self, key: str, result: dict) -> None:
        self.entries[key] = copy.deepcopy(result)

    def __len__(self) -> int:
        return len(self.entries)
