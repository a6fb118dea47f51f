"""Prometheus metrics of one app: requests, latency, tokens, limit rejections, queue depth, model state,
prompt tokens reused from the prefix cache.

Each app owns its :class:`~prometheus_client.CollectorRegistry`, so several apps
in one process (tests) never share or double-register a series. Requests are
recorded by the audit middleware, the one place that sees every request with
its final status (including those refused by authentication, which Litestar's
own Prometheus middleware counts as 200) and its output tokens. Model state and
queue depth are read from the engine at scrape time.

Metrics are per process: ``ai-platform serve --workers N`` gives N independent
sets, which is why the deployment runs one worker (it also loads each model once).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ai_platform.engine_contract import Engine

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "PlatformMetrics"]

PREFIX = "ai_platform"
# The classic text format, which every Prometheus version scrapes (the response adds the charset).
CONTENT_TYPE = "text/plain; version=0.0.4"
# Seconds. Refusals take milliseconds; generating 512 tokens on CPU can take minutes.
LATENCY_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LIMIT_EXCEEDED = 429


class _EngineCollector(Collector):
    """Model load state and queue depth of every operation, read from ``engine.status()`` at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        loaded = GaugeMetricFamily(
            f"{PREFIX}_model_loaded",
            "1 if the operation's model is loaded and serving, else 0.",
            labels=["operation", "model"],
        )
        queue = GaugeMetricFamily(
            f"{PREFIX}_queue_depth",
            "Requests waiting or running on the operation's model (shared by the operations it serves).",
            labels=["operation", "model"],
        )
        reused = CounterMetricFamily(
            f"{PREFIX}_prompt_tokens_reused",
            "Prompt positions taken from the model's prefix cache instead of computed (shared by its operations).",
            labels=["operation", "model"],
        )
        for status in self._engine.status():
            labels = [status.operation, status.model]
            loaded.add_metric(labels, 1.0 if status.loaded else 0.0)
            queue.add_metric(labels, float(status.queue_depth))
            reused.add_metric(labels, float(status.reused_prompt_tokens))
        yield loaded
        yield queue
        yield reused


class PlatformMetrics:
    """The metrics of one app and its ``/metrics`` exposition."""

    def __init__(self, engine: Engine, operations: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "requests",
            "HTTP requests by operation (empty for system endpoints), route, method and status.",
            ["operation", "route", "method", "status"],
            namespace=PREFIX,
            registry=self.registry,
        )
        self._latency = Histogram(
            "request_duration_seconds",
            "Time from request to response, by operation, route and status.",
            ["operation", "route", "status"],
            namespace=PREFIX,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._tokens = Counter(
            "generated_tokens",
            "Output tokens of served (200) operation requests.",
            ["operation"],
            namespace=PREFIX,
            registry=self.registry,
        )
        self._rejections = Counter(
            "limit_rejections",
            "Operation requests refused with 429 because the daily limit was reached.",
            ["operation"],
            namespace=PREFIX,
            registry=self.registry,
        )
        for name in operations:  # every operation's counters exist from the start, at 0
            self._tokens.labels(name)
            self._rejections.labels(name)
        self.registry.register(_EngineCollector(engine))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def observe(
        self, *, operation: str | None, route: str, method: str, status: int, duration_s: float, tokens: int
    ) -> None:
        """Record one finished request (called once per request by the audit middleware)."""
        name = operation or ""
        self._requests.labels(name, route, method, str(status)).inc()
        self._latency.labels(name, route, str(status)).observe(duration_s)
        if tokens:
            self._tokens.labels(name).inc(tokens)
        if status == LIMIT_EXCEEDED and operation:
            self._rejections.labels(name).inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
