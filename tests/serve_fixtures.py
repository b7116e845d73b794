"""A tiny checkpoint (random weights, a small trained tokenizer) for the engine and server tests,
and Served: an app on a real uvicorn on 127.0.0.1 (ephemeral port) in a background thread."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

from ryzen_llm.checkpoint import save_checkpoint
from ryzen_llm.config import Config, InferenceConfig, ModelConfig
from ryzen_llm.engine import Engine
from ryzen_llm.model import ScaledTransformerModel
from ryzen_llm.tokenizer import Tokenizer

TEXTS = [
    "the quick brown fox jumps over the lazy dog. ",
    "def add(a, b):\n    return a + b\n",
    "import os\nimport sys\nprint(os.path.join('a', 'b'))\n",
    "Once upon a time there was a small model that served text fast. ",
] * 20


def make_checkpoint(root: Path, seed: int = 0, max_seq_len: int = 96, name: str = "best") -> Path:
    tok = Tokenizer.train(TEXTS, vocab_size=320)
    tok_file = tok.save(root / "tok")
    config = Config(
        model=ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4,
                          d_ff=128, max_seq_len=max_seq_len),
        inference=InferenceConfig(warmup_steps=20, max_batch_size=32),
    )
    torch.manual_seed(seed)
    model = ScaledTransformerModel(config.model)
    # Random weights give near-uniform logits; scale the head so greedy choices are not ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    return save_checkpoint(root / "runs" / "t" / "optimized" / "checkpoints" / name, model,
                           config.to_dict(), tokenizer_file=tok_file)


PROMPTS = [
    "the quick", "def add(a, b):", "import os", "Once upon a time there was",
    "x", "print(", "the lazy dog. the quick brown fox jumps over", "return a",
]


class Served:
    """An app on a real uvicorn in a background thread."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.01)

    @property
    def engine(self) -> Engine:
        return self.app.state.engine

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics").text

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.stop()
