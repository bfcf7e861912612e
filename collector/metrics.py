"""The collector's own health as Prometheus metrics (``GET /metrics`` on its API port).

Nothing is counted twice: :class:`CollectorMetrics` reads the same counters that
``GET /health`` reports (:meth:`Collector.counters`, which holds the pipeline's and
each forwarder's) when it is scraped, and adds the pipeline's insert-latency
histogram. Store lag is the age of the oldest write-ahead log record not yet in
ClickHouse (0 when none waits), not "now minus the newest stored span": that one
grows whenever no traffic comes, while this one grows only when storing falls behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as _PrometheusCollector

__all__ = ["COUNTERS", "GAUGES", "CollectorMetrics", "collector_registry"]

PREFIX = "tokentrace_collector_"

# counters() key → (metric name without prefix and _total, help)
COUNTERS: dict[str, tuple[str, str]] = {
    "spans_received": (
        "spans_received",
        "Spans received (valid and rejected; packed token spans counted expanded).",
    ),
    "spans_stored": ("spans_stored", "Spans stored in ClickHouse (otel_traces rows)."),
    "spans_rejected": ("spans_rejected", "Spans rejected as invalid (permanent: never stored)."),
    "spans_refused": (
        "spans_refused",
        "Valid spans of exports refused as transient failures (the sender retries them).",
    ),
    "spans_lost": (
        "spans_lost",
        "Spans acknowledged, then refused by ClickHouse as permanently bad.",
    ),
    "exports_deduplicated": (
        "exports_deduplicated",
        "Exports sent again after being accepted, acknowledged without storing them twice.",
    ),
    "store_errors": ("store_errors", "Failed ClickHouse insert attempts (retried)."),
    "queries_refused": (
        "queries_refused",
        "Statements POST /query refused before running (not one read of tokentrace's data).",
    ),
}
# counters() key → (metric name without prefix, help)
GAUGES: dict[str, tuple[str, str]] = {
    "queries_running": ("queries_running", "Statements POST /query is running now."),
    "wal_pending_records": (
        "wal_pending_records",
        "Write-ahead log records not yet in ClickHouse.",
    ),
    "wal_pending_bytes": (
        "wal_pending_bytes",
        "Write-ahead log bytes some sink (ClickHouse or a forward target) has not had yet.",
    ),
    "wal_max_bytes": (
        "wal_max_bytes",
        "The disk budget for those bytes; past it exports are refused.",
    ),
    "queued_exports": (
        "queued_exports",
        "Decoded exports waiting for the write-ahead log writer (a bounded queue).",
    ),
    "store_lag_s": (
        "store_lag_seconds",
        "Age of the oldest write-ahead log record not yet in ClickHouse (0 when none).",
    ),
}
# counters()["forwarded"][url] key → (metric name without prefix, help, is a counter)
FORWARDED: dict[str, tuple[str, str, bool]] = {
    "sent_spans": ("spans_forwarded", "Spans a forward target acknowledged.", True),
    "dropped_spans": (
        "spans_forward_dropped",
        "Spans a forward target refused permanently (never retried).",
        True,
    ),
    "retries": ("forward_retries", "Failed forward attempts that were retried.", True),
    "pending_records": (
        "forward_pending_records",
        "Write-ahead log records a forward target has not had yet.",
        False,
    ),
}


class CollectorMetrics(_PrometheusCollector):
    """A custom Prometheus collector: ``counters()`` (the ``/health`` dict) read at
    scrape time, plus ``histograms`` collected as they are. Thread-safe as long as
    ``counters`` is."""

    def __init__(
        self, counters: Callable[[], dict[str, Any]], histograms: tuple[Histogram, ...] = ()
    ) -> None:
        self._counters = counters
        self._histograms = histograms

    def collect(self) -> Iterator[Metric]:
        values = self._counters()
        for key, (name, text) in COUNTERS.items():
            if key in values:
                yield CounterMetricFamily(PREFIX + name, text, value=values[key])
        for key, (name, text) in GAUGES.items():
            if key in values:
                yield GaugeMetricFamily(PREFIX + name, text, value=values[key])
        ok = GaugeMetricFamily(PREFIX + "store_ok", "1 when the last ClickHouse insert worked.")
        ok.add_metric([], 1.0 if values.get("store_ok", True) else 0.0)
        yield ok
        forwarded: dict[str, dict[str, int]] = values.get("forwarded") or {}
        for key, (name, text, counter) in FORWARDED.items():
            family: CounterMetricFamily | GaugeMetricFamily
            if counter:
                family = CounterMetricFamily(PREFIX + name, text, labels=["target"])
            else:
                family = GaugeMetricFamily(PREFIX + name, text, labels=["target"])
            for url, numbers in sorted(forwarded.items()):
                family.add_metric([url], numbers.get(key, 0))
            yield family
        for histogram in self._histograms:
            yield from histogram.collect()


def collector_registry(
    counters: Callable[[], dict[str, Any]], histograms: tuple[Histogram, ...] = ()
) -> CollectorRegistry:
    """A registry of its own holding one :class:`CollectorMetrics` (several collectors
    in one process, as in tests, keep separate numbers)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CollectorMetrics(counters, histograms))
    return registry
