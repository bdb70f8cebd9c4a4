"""Prometheus metrics of one server, in a registry of its own: HTTP responses by status, the scheduler's queue, slots
and caches (read when scraped), time to first token, inter-token latency and token counters."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "llava_rt"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# scheduler.stats() key -> (metric family, name, help)
SCHEDULER_STATS = {
    "running": (GaugeMetricFamily, "requests_running", "Requests in the running batch (busy slots)"),
    "queued": (GaugeMetricFamily, "requests_queued", "Requests waiting for a slot"),
    "feature_cache_hits": (CounterMetricFamily, "feature_cache_hits", "Images and videos whose features came from the cache"),
    "feature_cache_misses": (CounterMetricFamily, "feature_cache_misses", "Images and videos whose features were computed"),
    "prefix_cache_hits": (CounterMetricFamily, "prefix_cache_hits", "Requests that reused a cached KV prefix"),
    "prefix_cache_tokens": (CounterMetricFamily, "prefix_cache_tokens", "Prompt tokens whose KV came from the prefix cache"),
}


class _SchedulerCollector:
    """The scheduler's counts, asked for at scrape time (zeros while the model loads)."""

    def __init__(self, stats: Callable[[], dict | None]):
        self.stats = stats

    def collect(self):
        stats = self.stats() or {}
        for key, (family, name, help_text) in SCHEDULER_STATS.items():
            yield family(f"{PREFIX}_{name}", help_text, value=stats.get(key, 0))


class ServerMetrics:
    """The metrics of one app. `stats` returns the scheduler's `stats()`, or None while there is no scheduler."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, stats: Callable[[], dict | None]):
        self.registry = CollectorRegistry()
        self.responses = Counter(
            f"{PREFIX}_http_responses", "HTTP responses by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From a chat completion request's body having been read to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Between consecutive generated tokens of one request",
            buckets=INTER_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of admitted requests", registry=self.registry)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated", registry=self.registry)
        self.registry.register(_SchedulerCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self, arrived: float) -> "TokenTimer":
        """Times the tokens of one request that arrived at `arrived` (`time.monotonic()`)."""
        return TokenTimer(self, arrived)


class TokenTimer:
    """Records one request's time to first token, its inter-token latencies and its generated tokens, from the
    times the scheduler stamped on its events."""

    def __init__(self, metrics: ServerMetrics, arrived: float):
        self.metrics, self.last = metrics, arrived
        self.first = True

    def observe(self, event) -> None:
        if not event.tokens:
            return
        histogram = self.metrics.time_to_first_token if self.first else self.metrics.inter_token_latency
        histogram.observe(max(event.time - self.last, 0.0))
        self.metrics.generated_tokens.inc(event.tokens)
        self.first, self.last = False, event.time
