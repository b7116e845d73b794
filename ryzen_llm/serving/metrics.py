"""The server's Prometheus metrics (GET /metrics), in a registry of its own per app."""
from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, Info

from ryzen_llm.engine import Engine

LATENCY_BUCKETS_S = (.005, .01, .015, .025, .05, .075, .1, .25, .5, 1, 2.5, 5, 10, 30)
TOKEN_BUCKETS_S = (.0005, .001, .002, .004, .008, .016, .032, .064, .128, .5)


class Metrics:
    def __init__(self, engine: Engine):
        r = self.registry = CollectorRegistry()
        lat = LATENCY_BUCKETS_S
        self.requests = Counter("ryzen_llm_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.latency = Histogram("ryzen_llm_request_latency_seconds",
                                 "End-to-end request latency", ["route"], buckets=lat, registry=r)
        self.queue_time = Histogram("ryzen_llm_queue_time_seconds",
                                    "Time a prompt waited before prefill", buckets=lat, registry=r)
        self.ttft = Histogram("ryzen_llm_time_to_first_token_seconds",
                              "Time from arrival to the first generated token", buckets=lat,
                              registry=r)
        self.tpot = Histogram("ryzen_llm_time_per_output_token_seconds",
                              "Decode time per generated token after the first",
                              buckets=TOKEN_BUCKETS_S, registry=r)
        self.batch = Histogram("ryzen_llm_batch_size", "Live sequences per decode step",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.tokens = Counter("ryzen_llm_generated_tokens", "Tokens generated", registry=r)
        self.cache_hits = Counter("ryzen_llm_cache_hits", "Response cache hits", registry=r)
        self.cache_misses = Counter("ryzen_llm_cache_misses", "Response cache misses", registry=r)
        self.cancelled = Counter("ryzen_llm_cancelled", "Prompts cancelled (client gone or "
                                 "timed out)", ["reason"], registry=r)
        Info("ryzen_llm_model", "The model served, its kernel level and formats",
             registry=r).info({"model": engine.model_id, "level": str(engine.level),
                               "weights": engine.weights,
                               "kv_cache_dtype": engine.kv_cache_dtype})
        # python_gc_collections_total by generation: a full (2) collection pauses every thread
        GCCollector(registry=r)
        g = Gauge("ryzen_llm_gc_frozen_objects", "Objects moved out of the cyclic collector's "
                  "sight at startup (gc.freeze)", registry=r)
        g.set_function(gc.get_freeze_count)
        g = Gauge("ryzen_llm_queue_depth", "Prompts waiting for a batch slot", registry=r)
        g.set_function(lambda: engine.queue_depth)
        g = Gauge("ryzen_llm_running_sequences", "Sequences in the running batch", registry=r)
        g.set_function(lambda: engine.batch_size)
        g = Gauge("ryzen_llm_ready", "1 when warmed up and not draining", registry=r)
        self.ready_gauge = g

    def observe_timings(self, timings: dict) -> None:
        """A finished prompt's queue time, time to first token and time per output token."""
        for histogram, ms in ((self.queue_time, timings["queue_ms"]),
                              (self.ttft, timings["time_to_first_token_ms"]),
                              (self.tpot, timings["time_per_output_token_ms"])):
            if ms is not None:
                histogram.observe(ms / 1e3)

    def observe_result(self, result: dict) -> None:
        """A finished prompt's timings and its tokens (a streamed prompt counts its tokens as
        they go out, and calls observe_timings alone)."""
        self.observe_timings(result["timings"])
        self.tokens.inc(sum(len(c["token_ids"]) for c in result["candidates"]))
