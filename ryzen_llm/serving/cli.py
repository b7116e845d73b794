"""The server process: `python -m ryzen_llm.serve --checkpoint PATH [--host H] [--port P]`.

Finds the checkpoint, binds the socket, loads the Engine, and runs the app on uvicorn. SIGTERM
(or Ctrl-C) drains: /ready turns 503, new work gets 503, in-flight requests finish (up to
--drain-timeout), then it exits 0; a second signal stops at once.
"""
from __future__ import annotations

import argparse
import gc
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from ryzen_llm.config import WEIGHT_FORMATS
from ryzen_llm.engine import Engine
from ryzen_llm.ops.dispatch import LEVELS
from ryzen_llm.serving.app import create_app
from ryzen_llm.serving.gate import ServeState

MAKE_ONE = "python -m ryzen_llm.train --preset quick"


def latest_checkpoint(runs_dir: str | Path = "runs") -> Path | None:
    """The newest runs/*/{optimized,baseline}/checkpoints/best the trainer wrote."""
    found = [p for p in Path(runs_dir).glob("*/*/checkpoints/best")
             if p.parent.parent.name in ("optimized", "baseline")
             and (p / "manifest.json").is_file()]
    return max(found, key=lambda p: (p / "manifest.json").stat().st_mtime, default=None)


def draining_server(config, state: ServeState, drain_timeout_s: float):
    """A uvicorn.Server whose first SIGTERM/SIGINT drains instead of stopping at once."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if state.draining:  # a second signal: stop now
                self.force_exit = True
                self.should_exit = True
                return
            state.draining = True
            state.drain_started = time.monotonic()
            print(f"signal {signal.Signals(sig).name}: draining {state.inflight} in-flight "
                  f"request(s), up to {drain_timeout_s:g} s", flush=True)

        async def on_tick(self, counter: int) -> bool:
            if state.draining and (state.inflight == 0 or
                                   time.monotonic() - state.drain_started > drain_timeout_s):
                return True
            return await super().on_tick(counter)

    return DrainingServer(config)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ryzen_llm.serve",
                                description="Serve a trained checkpoint over HTTP.")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the newest "
                   "runs/*/{optimized,baseline}/checkpoints/best)")
    p.add_argument("--runs-dir", default="runs", help="where to look without --checkpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--api-key", default=os.environ.get("RYZEN_LLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $RYZEN_LLM_API_KEY)")
    p.add_argument("--level", type=int, choices=LEVELS,
                   help="kernel level (default: the checkpoint's; 3 and 4 generate from bfloat16 "
                   "weights, 0-2 from float32)")
    p.add_argument("--max-batch-size", type=int, help="live sequences per decode step")
    p.add_argument("--max-queue", type=int, help="waiting prompts before 429 (default 4x batch)")
    p.add_argument("--warmup-steps", type=int, help="decode steps before ready (default: "
                   "inference.warmup_steps of the checkpoint's config)")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--no-exact-batching", action="store_true",
                   help="levels 0-1 only: decode small batches without the dummy rows that make "
                   "greedy output bit-identical alone or batched (levels 2-3 need none)")
    p.add_argument("--kv-cache-dtype", choices=("float32", "int8"),
                   help="KV cache storage (default: inference.kv_cache_dtype of the checkpoint's "
                   "config); int8 keeps 0.27x the bytes, one fp32 scale per cached vector")
    p.add_argument("--weights", choices=WEIGHT_FORMATS,
                   help="linear weights to generate from (default: inference.weights of the "
                   "checkpoint's config, else bfloat16 at level 3 and float32 below); int8 and "
                   "int4 need level 2-3; combines with --kv-cache-dtype")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--access-log", action="store_true")
    p.add_argument("--debug-step-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (OSError when it cannot be had)."""
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says TCP, and without it Nagle + delayed ACK hold back keep-alive replies.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # listening from here on: a client that connects before uvicorn runs waits in the
        # backlog instead of being refused ("ready" can be printed before server.run starts)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def load_engine(args: argparse.Namespace, path: Path) -> Engine:
    import torch

    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    # Generation's parallel regions run on the engine's thread alone (see ryzen_llm.engine,
    # "Threads"): this thread loads the model with one.
    torch.set_num_threads(1)
    return Engine.from_checkpoint(
        path, level=args.level, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
        warmup_steps=args.warmup_steps, step_delay_s=args.debug_step_delay,
        exact=not args.no_exact_batching, threads=threads, kv_cache_dtype=args.kv_cache_dtype,
        weights=args.weights)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ryzen_llm.checkpoint import CheckpointError

    path = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(args.runs_dir)
    if path is None:
        print(f"error: no checkpoint given and none found under {args.runs_dir}/*/"
              f"{{optimized,baseline}}/checkpoints/best.\nMake one with:  {MAKE_ONE}\n"
              "or pass --checkpoint PATH.", file=sys.stderr)
        return 2
    try:
        sock = listen(args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    try:
        engine = load_engine(args, path)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sock.close()
        return 2
    app = create_app(engine, api_key=args.api_key or None, max_body_bytes=args.max_body_bytes,
                     request_timeout_s=args.request_timeout)
    run(app, engine, sock, args, path, port)
    return 0


def run(app, engine: Engine, sock: socket.socket, args: argparse.Namespace, path: Path,
        port: int) -> None:
    """Serves app on sock until a signal has drained it, then stops the engine."""
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=args.access_log,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = draining_server(config, app.state.serve_state, args.drain_timeout)
    print(f"serving {engine.model_id} from {path} ({engine.level_note}, "
          f"{engine.kv_cache_dtype} KV cache) on "
          f"http://{args.host}:{port}; warming up ({engine.warmup_steps} decode steps)",
          flush=True)

    def announce_ready():
        if engine.wait_ready(600):
            print(f"ready on http://{args.host}:{port}", flush=True)

    # What is loaded by now (torch, the model, the web stack) lives as long as the process.
    # Frozen, it is out of the cyclic collector's sight: a full collection under load no longer
    # walks it, which otherwise pauses every thread for a while.
    gc.collect()
    gc.freeze()
    threading.Thread(target=announce_ready, daemon=True).start()
    server.run(sockets=[sock])
    engine.stop()
    print("stopped", flush=True)
