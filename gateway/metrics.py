"""Prometheus metrics, correct across Gunicorn workers (prometheus_client multiprocess mode).

ops/gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a fresh directory before any worker starts and marks
dead workers; every worker writes its own files there and /metrics merges them.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from runner import outcomes

CALLS = Counter("fnbox_calls_total", "Function calls answered, by function, outcome and HTTP status",
                ["function", "outcome", "status"])
DURATION = Histogram("fnbox_call_duration_seconds", "Wall time of a call as the gateway saw it", ["function"],
                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
IN_FLIGHT = Gauge("fnbox_calls_in_flight", "Calls being run right now", multiprocess_mode="livesum")
KILLS = Counter("fnbox_sandbox_kills_total", "Calls the sandbox ended, by reason", ["reason"])
PEAK_MEMORY = Histogram("fnbox_call_peak_memory_bytes", "Peak RSS of a call's processes", ["function"],
                        buckets=tuple(m * 1024 * 1024 for m in (16, 24, 32, 48, 64, 128, 256, 512, 1024)))
RESTARTS = Counter("fnbox_forkserver_restarts_total", "Fork servers restarted after dying")

KILL_REASONS = frozenset({outcomes.TIMEOUT, outcomes.MEMORY_LIMIT, outcomes.OUTPUT_LIMIT})


def observe(function: str, outcome: str, status: int, seconds: float) -> None:
    """At answer time, so that /metrics counts every answered call."""
    CALLS.labels(function, outcome, str(status)).inc()
    DURATION.labels(function).observe(seconds)
    if outcome in KILL_REASONS:
        KILLS.labels(outcome).inc()


def observe_memory(function: str, max_rss_kb: int | None) -> None:
    """When the call's processes are gone and their peak is known."""
    if max_rss_kb:
        PEAK_MEMORY.labels(function).observe(max_rss_kb * 1024)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
