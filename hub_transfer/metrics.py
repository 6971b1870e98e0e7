"""Prometheus metrics, in a registry of the service's own.

A registry per application (not the process-wide default) keeps our series
apart from any JupyterHub code imported into the process, and lets tests build
several applications side by side.
"""

from __future__ import annotations

import asyncio
import typing as t

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30)


class Metrics:
    """Every series the service exposes on ``{prefix}metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "hub_transfer_requests",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "hub_transfer_request_duration_seconds",
            "Time to answer an HTTP request",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.globus_calls = Counter(
            "hub_transfer_globus_calls",
            "Calls made to Globus, by operation and outcome",
            ["operation", "outcome"],
            registry=self.registry,
        )
        self.globus_seconds = Histogram(
            "hub_transfer_globus_call_duration_seconds",
            "Time one Globus call took, retries included",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.cache_events = Gauge(
            "hub_transfer_cache_events",
            "Token cache hits and misses since start, by cache",
            ["cache", "event"],
            registry=self.registry,
        )
        self.cache_size = Gauge(
            "hub_transfer_cache_entries",
            "Entries currently in each token cache",
            ["cache"],
            registry=self.registry,
        )
        self.executor_queue = Gauge(
            "hub_transfer_globus_queue_depth",
            "Globus calls waiting for a worker thread",
            registry=self.registry,
        )
        self.executor_busy = Gauge(
            "hub_transfer_globus_calls_in_flight",
            "Globus calls running or waiting",
            registry=self.registry,
        )
        self.tracked_tasks = Gauge(
            "hub_transfer_tracked_tasks",
            "Tasks holding ACL rules (ACL mode)",
            registry=self.registry,
        )
        self.live_rules = Gauge(
            "hub_transfer_acl_rules",
            "ACL rules the service tracks on the collection (ACL mode)",
            registry=self.registry,
        )
        self.loop_lag = Gauge(
            "hub_transfer_event_loop_lag_seconds",
            "How late the last event-loop heartbeat ran",
            registry=self.registry,
        )

    def observe_request(
        self, route: str, method: str, status: int, seconds: float
    ) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route, method).observe(seconds)

    def observe_call(self, operation: str, outcome: str, seconds: float) -> None:
        self.globus_calls.labels(operation, outcome).inc()
        self.globus_seconds.labels(operation).observe(seconds)

    def refresh_caches(self, caches: dict[str, t.Any]) -> None:
        """Copy cache counters into gauges just before a scrape."""
        for name, cache in caches.items():
            stats = cache.stats()
            self.cache_events.labels(name, "hit").set(stats["hits"])
            self.cache_events.labels(name, "miss").set(stats["misses"])
            self.cache_size.labels(name).set(stats["size"])

    async def watch_loop_lag(self, interval: float = 1.0) -> None:
        """Record how late a periodic wake-up runs: a blocked loop shows here."""
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + interval
            await asyncio.sleep(interval)
            self.loop_lag.set(max(0.0, loop.time() - expected))
