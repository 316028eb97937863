"""Prometheus metrics, named like vLLM's with the `rattn:` prefix."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
FINE_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


class Metrics:
    """Also the engine's observer: it hears about prefills and decode steps."""

    def __init__(self, engine_state):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("rattn:num_requests_running", "Requests in the engine", registry=r)
        self.waiting = Gauge("rattn:num_requests_waiting", "Requests queued for the engine", registry=r)
        self.prompt_tokens = Counter("rattn:prompt_tokens", "Prefilled prompt tokens", registry=r)
        self.generation_tokens = Counter("rattn:generation_tokens", "Generated tokens", registry=r)
        self.success = Counter("rattn:request_success", "Finished requests", ["finished_reason"], registry=r)
        self.ttft = Histogram("rattn:time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("rattn:inter_token_latency_seconds", "Time between tokens", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("rattn:e2e_request_latency_seconds", "Request latency", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.index_build = Histogram("rattn:index_build_seconds", "Index build time of one request (all layers)",
                                     registry=r, buckets=LATENCY_BUCKETS)
        self.retrieval = Histogram("rattn:retrieval_seconds", "One layer's CPU lookups + partial attention",
                                   registry=r, buckets=FINE_BUCKETS)
        self.cpu_kv = Gauge("rattn:cpu_kv_bytes", "Bytes of offloaded K/V and indexes in CPU memory", registry=r)
        self.cpu_kv_budget = Gauge("rattn:cpu_kv_budget_bytes", "Host memory the running requests' CPU stores and "
                                   "the document cache may take together (--cpu-kv-budget)", registry=r)
        self.prefill_progress = Gauge("rattn:prefill_progress", "Share of the running prefill's layers done "
                                      "(0 when none runs)", registry=r)
        self.queue_time = Histogram("rattn:request_queue_time_seconds", "Time a request waited for the engine",
                                    registry=r, buckets=LATENCY_BUCKETS)
        self.prefill_time = Histogram("rattn:request_prefill_time_seconds", "Prefill of a request, index builds "
                                      "included, until its first token", registry=r, buckets=LATENCY_BUCKETS)
        self.decode_time = Histogram("rattn:request_decode_time_seconds", "First token to last of a request",
                                     registry=r, buckets=LATENCY_BUCKETS)
        cache = lambda: engine_state().doc_cache if engine_state() else None  # noqa: E731
        for name, field, doc in (("hits", "hits", "Requests that reused a cached document prefix"),
                                 ("misses", "misses", "Requests of 1,024 tokens or more that found no prefix to reuse"),
                                 ("evictions", "evictions", "Entries evicted to make room"),
                                 ("cached_tokens", "cached_tokens", "Prompt tokens reused from the cache"),
                                 ("bytes", "bytes", "Host memory held by the document cache's entries"),
                                 ("entries", "entries", "Entries in the document cache")):
            g = Gauge(f"rattn:doc_cache_{name}", doc, registry=r)  # gauges: read from the cache on each scrape
            g.set_function(lambda f=field: getattr(cache().stats(), f) if cache() else 0)
        self.doc_cache_budget = Gauge("rattn:doc_cache_budget_bytes", "Host memory the document cache may take "
                                      "(--doc-cache-gb)", registry=r)
        self.doc_cache_budget.set_function(lambda: cache().budget if cache() else 0)
        # read live on scrape, so they are never stale
        self.running.set_function(lambda: engine_state().num_running if engine_state() else 0)
        self.waiting.set_function(lambda: engine_state().num_waiting if engine_state() else 0)
        self.cpu_kv.set_function(lambda: engine_state().cpu_kv_bytes() if engine_state() else 0)
        self.cpu_kv_budget.set_function(lambda: engine_state().cpu_kv_budget if engine_state() else 0)
        self.prefill_progress.set_function(lambda: engine_state().prefill_done if engine_state() else 0)

    # EngineObserver
    def on_prefill(self, stats) -> None:
        self.prompt_tokens.inc(stats.tokens)
        if stats.offloaded:
            self.index_build.observe(stats.build_s)

    def on_decode_step(self, stats) -> None:
        if stats.lookup_s_per_layer > 0:
            self.retrieval.observe(stats.lookup_s_per_layer)

    def on_request_done(self, times) -> None:
        self.queue_time.observe(times.queue_s)
        self.prefill_time.observe(times.prefill_s)
        self.decode_time.observe(times.decode_s)
