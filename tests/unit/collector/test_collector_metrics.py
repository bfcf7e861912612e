"""The collector's /metrics: what ``Collector.counters()`` (the /health dict) becomes
in the Prometheus text format, parsed back as a scraper parses it."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tokentrace.collector.metrics import COUNTERS, GAUGES, collector_registry

HEALTH: dict[str, Any] = {
    "spans_received": 17,
    "spans_stored": 16,
    "spans_rejected": 1,
    "spans_refused": 2,
    "spans_lost": 0,
    "packed_decode_spans": 3,
    "store_errors": 4,
    "wal_replayed_records": 0,
    "exports_deduplicated": 5,
    "store_ok": False,
    "store_error": "disk full",
    "wal_pending_records": 6,
    "wal_pending_bytes": 7000,
    "wal_max_bytes": 1 << 30,
    "store_lag_s": 2.5,
    "queued_exports": 8,
    "queries_running": 1,
    "queries_refused": 9,
    "forwarded": {
        "grpc://a:4317": {"sent_spans": 10, "dropped_spans": 1, "retries": 2, "pending_records": 3},
        "http://b:4318": {"sent_spans": 20, "dropped_spans": 0, "retries": 0, "pending_records": 0},
    },
}


def _scrape(health: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(collector_registry(lambda: health)).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_become_prometheus_counters_and_gauges() -> None:
    scraped = _scrape(HEALTH)
    for key, (name, _) in COUNTERS.items():
        assert scraped[(f"tokentrace_collector_{name}_total", ())] == HEALTH[key], key
    for key, (name, _) in GAUGES.items():
        assert scraped[(f"tokentrace_collector_{name}", ())] == HEALTH[key], key
    assert scraped[("tokentrace_collector_store_lag_seconds", ())] == 2.5
    assert scraped[("tokentrace_collector_store_ok", ())] == 0


def test_forward_targets_are_labelled_by_url() -> None:
    scraped = _scrape(HEALTH)
    a, b = (("target", "grpc://a:4317"),), (("target", "http://b:4318"),)
    assert scraped[("tokentrace_collector_spans_forwarded_total", a)] == 10
    assert scraped[("tokentrace_collector_spans_forwarded_total", b)] == 20
    assert scraped[("tokentrace_collector_spans_forward_dropped_total", a)] == 1
    assert scraped[("tokentrace_collector_forward_retries_total", a)] == 2
    assert scraped[("tokentrace_collector_forward_pending_records", a)] == 3


def test_counters_are_read_at_every_scrape() -> None:
    health = {"spans_stored": 1, "store_ok": True}
    registry = collector_registry(lambda: health)
    first = generate_latest(registry).decode()
    health["spans_stored"] = 41
    second = generate_latest(registry).decode()
    assert "tokentrace_collector_spans_stored_total 1.0" in first
    assert "tokentrace_collector_spans_stored_total 41.0" in second


@pytest.mark.parametrize("store_ok", [True, False])
def test_store_ok_is_one_or_zero(store_ok: bool) -> None:
    scraped = _scrape({"store_ok": store_ok})
    assert scraped[("tokentrace_collector_store_ok", ())] == (1 if store_ok else 0)
