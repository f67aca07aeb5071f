"""Prometheus metrics: requests by route and status, latency histograms, and the worker's gauges.

Each app owns its own registry (tests build several apps in one process); the worker's figures
are read at scrape time through a collector instead of being copied on every change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.protocol import WorkerStats

NAMESPACE = "speechchat"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)  # s
TOKENS_PER_SECOND_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000)  # tok/s
UNMATCHED_ROUTE = "unmatched"  # label for 404s, so random paths cannot blow up label cardinality
CONTENT_TYPE = CONTENT_TYPE_LATEST


class WorkerCollector(Collector):
    """Reads `WorkerStats` when Prometheus scrapes."""

    def __init__(self, read_stats: Callable[[], WorkerStats | None]) -> None:
        self.read_stats = read_stats

    def collect(self) -> Iterator[Metric]:
        stats = self.read_stats()
        if stats is None:
            return
        yield GaugeMetricFamily(
            f"{NAMESPACE}_active_sessions", "sessions held by the worker", stats.active_sessions
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_running_requests", "responses being generated", stats.running_requests
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_kv_cache_bytes", "bytes of KV cache held", stats.kv_cache_bytes
        )
        yield GaugeMetricFamily(
            f"{NAMESPACE}_kv_budget_bytes", "KV cache byte budget", stats.kv_budget_bytes
        )
        yield CounterMetricFamily(
            f"{NAMESPACE}_audio_seconds",
            "seconds of input audio processed",
            stats.audio_seconds_total,
        )


class Metrics:
    """The app's metrics and its registry."""

    def __init__(self, read_stats: Callable[[], WorkerStats | None]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{NAMESPACE}_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            f"{NAMESPACE}_time_to_first_token_seconds",
            "from request received (or end of speech) to first text delta",
            ["route"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tokens_per_second = Histogram(
            f"{NAMESPACE}_tokens_per_second",
            "completion tokens per second after the first token",
            ["route"],
            buckets=TOKENS_PER_SECOND_BUCKETS,
            registry=self.registry,
        )
        self.realtime_connections = Counter(
            f"{NAMESPACE}_realtime_connections",
            "WebSocket connections accepted on /v1/realtime",
            registry=self.registry,
        )
        self.registry.register(WorkerCollector(read_stats))

    def observe_generation(
        self, route: str, ttft: float | None, tokens: int, decode_seconds: float
    ) -> None:
        """Record one finished response: time to first token and decode speed."""
        if ttft is not None:
            self.ttft.labels(route).observe(ttft)
        if tokens > 1 and decode_seconds > 0:
            self.tokens_per_second.labels(route).observe((tokens - 1) / decode_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class GenerationTimer:
    """Times one response: start, first delta, last delta."""

    def __init__(self, start: float | None = None) -> None:
        self.start = time.perf_counter() if start is None else start
        self.first: float | None = None
        self.last: float | None = None

    def mark_delta(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start

    @property
    def decode_seconds(self) -> float:
        if self.first is None or self.last is None:
            return 0.0
        return self.last - self.first


class RequestCounter:
    """ASGI middleware counting HTTP responses by route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: Callable[[], Metrics | None]) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            metrics = self.metrics()
            if metrics is not None:
                route = scope.get("route")
                name = getattr(route, "path", None) or UNMATCHED_ROUTE
                metrics.requests.labels(name, scope["method"], str(status)).inc()
