"""Prometheus metrics of one server (its own registry, so that several servers may live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fastkv_requests", "requests answered, by HTTP status", ["status"], registry=r)
        self.cancelled = Counter("fastkv_cancelled", "requests dropped because their client went away", registry=r)
        self.tokens = Counter("fastkv_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("fastkv_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.running = Gauge("fastkv_running_requests", "requests in the decode batch", registry=r)
        self.queued = Gauge("fastkv_queued_requests", "requests waiting for memory or a batch row", registry=r)
        self.kv_bytes = Gauge("fastkv_kv_cache_bytes", "bytes of the decode batch's K/V buffers", registry=r)
        self.queue_seconds = Histogram("fastkv_queue_seconds", "time from arrival to prefill", registry=r)
        self.prefill_seconds = Histogram("fastkv_prefill_seconds", "prefill time per request", registry=r)
        self.prefix_hits = Counter("fastkv_prefix_hits", "prompts that started from a stored prefix", registry=r)
        self.prefix_misses = Counter("fastkv_prefix_misses", "prompts that started from none", registry=r)
        self.prefix_tokens = Counter("fastkv_prefix_tokens_reused", "prompt tokens taken from the store", registry=r)
        self.decode_evicted = Counter("fastkv_decode_evicted_entries", "generated KV entries evicted by decode "
                                      "budgets, summed over layers and KV heads", registry=r)  # fmt: skip
        self.prefix_bytes = Gauge("fastkv_prefix_store_bytes", "bytes held by the prefix store", registry=r)

    def finished(self, result) -> None:
        s = result.stats
        self.tokens.inc(s.new_tokens)
        self.prompt_tokens.inc(s.prompt_tokens)
        self.prefill_seconds.observe(s.prefill_seconds)
        (self.prefix_hits if s.prefix_tokens_reused else self.prefix_misses).inc()
        self.prefix_tokens.inc(s.prefix_tokens_reused)
        self.decode_evicted.inc(s.kv_evicted)
