"""Load generator for `python -m ryzen_llm.serve`: latency percentiles, time to first token,
throughput and errors by status.

    python -m ryzen_llm.loadtest --url http://127.0.0.1:8000 --concurrency 8 --duration 30
    python -m ryzen_llm.loadtest --url http://127.0.0.1:8000 --rate 5 --duration 60 --stream \
        --json results/loadtest-rate5.json

Two ways to send:
  * closed loop (default): `--concurrency` clients, each sends its next request when the
    previous one returns;
  * open loop (`--rate R`): requests arrive as a Poisson process of R per second (exponential
    gaps, seeded), whatever is still in flight; `--concurrency` then caps the connections.
Both stop sending at `--duration` seconds or `--max-requests` requests, whichever comes first,
then wait up to `--grace` seconds for the requests in flight (the rest count as "cancelled").

Each request is greedy with ignore_eos, so it generates exactly `--max-new-tokens` tokens per
prompt; `--prompts-per-request K` sends K prompts in each request (a client batching its work,
as one generate() call over K prompts does), taken in turn from the prompt list.
Without `--stream` it POSTs /infer with use_cache false (the response cache would otherwise
answer repeats); with `--stream` it POSTs /v1/completions with "stream": true (never cached)
and also measures the time to the first token event. Percentiles are linearly interpolated
between the closest ranks (numpy's default). A tool that records: nothing here judges a time.

It sends with aiohttp, which took several times less CPU per request than httpx.AsyncClient
where both were measured (docs/serving.md): run on the server's machine, the load generator
takes as little as it can of the cores it measures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

DEFAULT_PROMPT = "def main(args):\n    parser = argparse.ArgumentParser(description="


def percentile(xs: Sequence[float], q: float) -> float | None:
    """q-th percentile (0-100), linear interpolation between closest ranks; None when empty."""
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"q: expected a percentile in [0, 100], got {q!r}")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(xs: Sequence[float]) -> dict[str, float | None]:
    return {"p50": percentile(xs, 50), "p95": percentile(xs, 95), "p99": percentile(xs, 99),
            "mean": sum(xs) / len(xs) if xs else None, "max": max(xs) if xs else None}


@dataclass
class Sample:
    start_s: float  # since the run began
    status: str  # HTTP status, or the exception's name for a failed connection
    latency_ms: float
    ttft_ms: float | None = None
    tokens: int = 0


@dataclass
class LoadResult:
    url: str
    mode: str  # "closed" or "poisson"
    concurrency: int
    rate: float | None
    duration_s: float
    max_requests: int | None
    stream: bool
    max_new_tokens: int
    prompts_per_request: int = 1
    wall_s: float = 0.0
    sent: int = 0
    cancelled: int = 0  # still in flight when the grace period ended
    samples: list[Sample] = field(default_factory=list)

    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status == "200"]

    def window(self, start_s: float, end_s: float) -> dict:
        """Percentiles of the successful requests that started in [start_s, end_s)."""
        lat = [s.latency_ms for s in self.ok() if start_s <= s.start_s < end_s]
        return {"requests": len(lat), **{f"{k}_ms": v for k, v in summarize(lat).items()}}

    def to_dict(self, with_samples: bool = True) -> dict:
        ok = self.ok()
        tokens = sum(s.tokens for s in ok)
        errors = Counter(s.status for s in self.samples if s.status != "200")
        if self.cancelled:
            errors["cancelled"] += self.cancelled
        out = {
            "kind": "loadtest",
            "url": self.url, "mode": self.mode, "concurrency": self.concurrency,
            "rate": self.rate, "duration_s": self.duration_s, "max_requests": self.max_requests,
            "stream": self.stream, "max_new_tokens": self.max_new_tokens,
            "prompts_per_request": self.prompts_per_request,
            "wall_s": self.wall_s, "sent": self.sent, "completed": len(ok),
            "errors": dict(sorted(errors.items())), "error_count": sum(errors.values()),
            "requests_per_s": len(ok) / self.wall_s if self.wall_s else None,
            "tokens_per_s": tokens / self.wall_s if self.wall_s else None,
            "generated_tokens": tokens,
            "latency_ms": summarize([s.latency_ms for s in ok]),
            "ttft_ms": summarize([s.ttft_ms for s in ok if s.ttft_ms is not None])
            if self.stream else None,
        }
        if with_samples:
            out["samples"] = [[round(s.start_s, 4), s.status, round(s.latency_ms, 3),
                               None if s.ttft_ms is None else round(s.ttft_ms, 3), s.tokens]
                              for s in self.samples]
        return out


async def _one(session, url: str, t_run: float, t0: float, prompts: list[str], args: dict,
               stream: bool, headers: dict) -> Sample:
    """One request sent at t0 (perf_counter seconds): the moment the load decided to send it
    (closed loop) or its scheduled arrival (Poisson), so a client running late counts against
    the latency instead of hiding it."""
    start = t0 - t_run
    ttft, tokens = None, 0
    try:
        if stream:
            body = {"prompt": prompts if len(prompts) > 1 else prompts[0],
                    "max_tokens": args["max_new_tokens"], "temperature": 0,
                    "ignore_eos": True, "stream": True}
            async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
                status = str(r.status)
                if r.status == 200:
                    async for raw in r.content:  # one line at a time
                        line = raw.decode().rstrip("\r\n")
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:  # a failure after the 200 header went out
                            status = f"stream-error-{event['error'].get('code')}"
                            break
                        if event["choices"][0]["finish_reason"] is None:  # an event per token
                            tokens += 1
                            if ttft is None:
                                ttft = (time.perf_counter() - t0) * 1e3
                else:
                    await r.read()
        else:
            body = {"inputs": prompts, "max_new_tokens": args["max_new_tokens"],
                    "temperature": 0, "ignore_eos": True, "use_cache": False}
            async with session.post(url + "/infer", json=body, headers=headers) as r:
                status = str(r.status)
                if r.status == 200:
                    tokens = sum(o["completion_tokens"] for o in (await r.json())["outputs"])
                else:
                    await r.read()
    except Exception as exc:  # connection refused, reset, read timeout: counted, not raised
        status = type(exc).__name__
    return Sample(start, status, (time.perf_counter() - t0) * 1e3, ttft, tokens)


async def run_load(url: str, *, concurrency: int = 1, duration: float = 10.0,
                   rate: float | None = None, max_requests: int | None = None,
                   prompts: Sequence[str] = (DEFAULT_PROMPT,), max_new_tokens: int = 16,
                   api_key: str | None = None, stream: bool = False, seed: int = 0,
                   grace: float = 60.0, timeout: float = 120.0,
                   prompts_per_request: int = 1) -> LoadResult:
    """Sends load to url until duration seconds or max_requests requests; see the module doc."""
    import aiohttp

    if concurrency < 1:
        raise ValueError(f"concurrency: expected an int >= 1, got {concurrency!r}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate: expected requests per second > 0, got {rate!r}")
    if duration <= 0:
        raise ValueError(f"duration: expected seconds > 0, got {duration!r}")
    if max_requests is not None and max_requests < 1:
        raise ValueError(f"max_requests: expected an int >= 1, got {max_requests!r}")
    if not isinstance(prompts_per_request, int) or prompts_per_request < 1:
        raise ValueError(f"prompts_per_request: expected an int >= 1, got "
                         f"{prompts_per_request!r}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: expected at least one prompt")
    res = LoadResult(url, "poisson" if rate else "closed", concurrency, rate, duration,
                     max_requests, stream, max_new_tokens, prompts_per_request)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    args = {"max_new_tokens": max_new_tokens}
    limit = max_requests if max_requests is not None else math.inf
    base = url.rstrip("/")
    # at most `concurrency` connections, kept alive between requests
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        t_run = time.perf_counter()
        deadline = t_run + duration
        tasks: list[asyncio.Task] = []

        def launch(t0: float) -> asyncio.Task:
            first = res.sent * prompts_per_request
            group = [prompts[(first + j) % len(prompts)] for j in range(prompts_per_request)]
            res.sent += 1
            return asyncio.ensure_future(_one(session, base, t_run, t0, group, args, stream,
                                              headers))

        if rate is None:
            async def worker():
                while res.sent < limit:
                    now = time.perf_counter()
                    if now >= deadline:
                        break
                    task = launch(now)
                    tasks.append(task)
                    await task

            await asyncio.gather(*[worker() for _ in range(concurrency)])
        else:
            rng = random.Random(seed)
            t_next = rng.expovariate(rate)
            while res.sent < limit and t_next < duration:
                delay = t_run + t_next - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(launch(t_run + t_next))
                t_next += rng.expovariate(rate)
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            res.cancelled = len(pending)
            res.samples = sorted((t.result() for t in done), key=lambda s: s.start_s)
        res.wall_s = time.perf_counter() - t_run
    return res


def format_result(d: dict) -> str:
    def ms(x):
        return "n/a" if x is None else f"{x:.1f} ms"

    load = (f"concurrency {d['concurrency']}" if d["mode"] == "closed"
            else f"Poisson {d['rate']:g}/s (max {d['concurrency']} connections)")
    lat = d["latency_ms"]
    k = d.get("prompts_per_request", 1)
    lines = [
        f"{d['url']}  {load}, {'streaming /v1/completions' if d['stream'] else '/infer'}, "
        + (f"{k} prompts per request, " if k > 1 else "") + f"{d['max_new_tokens']} new tokens"
        + (" each" if k > 1 else ""),
        f"  requests: {d['sent']} sent, {d['completed']} ok, {d['error_count']} errors "
        f"in {d['wall_s']:.1f} s",
        f"  latency:  p50 {ms(lat['p50'])}  p95 {ms(lat['p95'])}  p99 {ms(lat['p99'])}  "
        f"mean {ms(lat['mean'])}",
    ]
    if d["ttft_ms"] is not None:
        t = d["ttft_ms"]
        lines.append(f"  first token: p50 {ms(t['p50'])}  p95 {ms(t['p95'])}  p99 {ms(t['p99'])}")
    rps, tps = d["requests_per_s"], d["tokens_per_s"]
    lines.append(f"  throughput: {rps or 0:.2f} requests/s, {tps or 0:.1f} generated tokens/s")
    if d["errors"]:
        lines.append("  errors: " + ", ".join(f"{k}: {v}" for k, v in d["errors"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ryzen_llm.loadtest",
                                description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--concurrency", type=int,
                   help="clients in closed loop (default 1); the connection cap with --rate "
                        "(default 64)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds to send for")
    p.add_argument("--rate", type=float, help="Poisson arrivals per second (open loop)")
    p.add_argument("--max-requests", type=int, help="stop after this many requests")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--prompts-per-request", type=int, default=1, metavar="K",
                   help="prompts in each request (the prompt repeated K times)")
    p.add_argument("--stream", action="store_true",
                   help="streaming /v1/completions (measures time to first token)")
    p.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    p.add_argument("--grace", type=float, default=60.0,
                   help="seconds to wait for requests in flight after sending stops")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--json", metavar="PATH", help="write the results (with every sample) here")
    args = p.parse_args(argv)
    concurrency = args.concurrency if args.concurrency is not None else 64 if args.rate else 1
    try:
        res = asyncio.run(run_load(
            args.url, concurrency=concurrency, duration=args.duration, rate=args.rate,
            max_requests=args.max_requests, prompts=[args.prompt],
            max_new_tokens=args.max_new_tokens, api_key=args.api_key, stream=args.stream,
            seed=args.seed, grace=args.grace, timeout=args.timeout,
            prompts_per_request=args.prompts_per_request))
    except ValueError as exc:
        p.error(str(exc))
    d = res.to_dict()
    print(format_result(d))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(d, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
