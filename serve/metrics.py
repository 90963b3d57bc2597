"""Prometheus metrics of one server (its own registry, so several servers can share a process).

Names follow vLLM's with a ``jaxinfer:`` prefix. Engine gauges and counters are read from the engine
thread's latest ``stats()`` snapshot at scrape time; request latencies are observed when a request
ends, from the engine's timings (``time.perf_counter`` clock).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxinfer.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                 2.5, 5.0)


class _EngineCollector:
    """Gauges and counters from the engine's stats snapshot and the server's admission state."""

    def __init__(self, stats: Callable[[], object], in_flight: Callable[[], int]):
        self._stats = stats
        self._in_flight = in_flight

    def collect(self):
        s = self._stats()
        yield GaugeMetricFamily("jaxinfer:num_requests_in_server",
                                "Requests admitted by the server and not yet finished", value=self._in_flight())
        if s is None:
            return
        gauges = {
            "num_requests_running": ("Requests running in the engine", s.num_running),
            "num_requests_waiting": ("Requests waiting in the engine's queue", s.num_waiting),
            "kv_cache_pages_used": ("KV-cache pages in use", s.num_pages_used),
            "kv_cache_pages_free": ("KV-cache pages free", s.num_pages_total - s.num_pages_used),
            "kv_cache_pages_total": ("KV-cache pages in total", s.num_pages_total),
            "kv_cache_usage_perc": ("Fraction of KV-cache pages in use (0..1)",
                                    s.num_pages_used / s.num_pages_total if s.num_pages_total else 0.0),
            "prefix_cache_hit_rate": ("Prefix-cache hits / queries, in tokens (0..1)", s.prefix_cache_hit_rate),
            "prefix_cache_pages": ("KV-cache pages held in the prefix cache (in use or evictable)",
                                   s.prefix_cache_pages),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"jaxinfer:{name}", doc, value=float(value))
        counters = {
            "prompt_tokens": ("Prompt tokens processed", s.prompt_tokens_total),
            "generation_tokens": ("Tokens generated", s.generation_tokens_total),
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache", s.prefix_cache_queries),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache", s.prefix_cache_hits),
            "num_preemptions": ("Requests preempted for lack of KV-cache pages", s.num_preemptions),
            "prefix_cache_evictions": ("Cached KV-cache pages evicted (least recently used first)",
                                       s.prefix_cache_evictions),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"jaxinfer:{name}", doc, value=float(value))


class ServerMetrics:
    """The server's registry: request outcomes and latency histograms plus the engine collector."""

    def __init__(self, stats: Callable[[], object], in_flight: Callable[[], int]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_success = Counter("jaxinfer:request_success", "Requests finished, by finish reason",
                                       ["finished_reason"], registry=r)
        self.request_rejected = Counter("jaxinfer:request_rejected",
                                        "Requests refused before reaching the engine (queue_full, shutting_down)",
                                        ["reason"], registry=r)
        self.request_errors = Counter("jaxinfer:request_errors", "Requests answered with an error, by HTTP status",
                                      ["status"], registry=r)
        self.ttft = Histogram("jaxinfer:time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("jaxinfer:time_per_output_token_seconds",
                              "Time per output token after the first: (e2e - ttft) / (tokens - 1)",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("jaxinfer:e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.engine_step = Histogram("jaxinfer:engine_step_duration_seconds",
                                     "Duration of one engine step (schedule, device step, detokenize)",
                                     buckets=_TPOT_BUCKETS, registry=r)
        self.prompt_len = Histogram("jaxinfer:request_prompt_tokens", "Prompt length of finished requests",
                                    buckets=(16, 64, 256, 1024, 4096, 16384), registry=r)
        self.generation_len = Histogram("jaxinfer:request_generation_tokens",
                                        "Generated tokens of finished requests (all samples)",
                                        buckets=(1, 16, 64, 256, 1024, 4096), registry=r)
        r.register(_EngineCollector(stats, in_flight))

    def observe_finished(self, out: RequestOutput, n: int) -> None:
        """Record a request that ended (finished or aborted) with its final output's metrics."""
        reasons = [c.finish_reason for c in out.outputs if c.finish_reason]
        self.request_success.labels(finished_reason=reasons[0] if reasons else "abort").inc()
        m = out.metrics
        self.prompt_len.observe(len(out.prompt_token_ids))
        self.generation_len.observe(m.num_generated_tokens)
        if m.first_token_time is None:
            return
        self.ttft.observe(max(0.0, m.first_token_time - m.arrival_time))
        if m.finish_time is not None:
            self.e2e.observe(max(0.0, m.finish_time - m.arrival_time))
            per_sample = m.num_generated_tokens / max(n, 1)
            if per_sample > 1:
                self.tpot.observe(max(0.0, m.finish_time - m.first_token_time) / (per_sample - 1))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
