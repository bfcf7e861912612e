"""The collector's one retry policy and error shape, used by the ClickHouse writer and
the OTLP forwarder alike."""

from __future__ import annotations

import pytest

from tokentrace.collector.ingest.forward import ForwardError
from tokentrace.collector.retry import CollectorError, backoff_s, jittered_backoff_s
from tokentrace.collector.store import StoreError


def test_backoff_doubles_then_caps() -> None:
    schedule = [backoff_s(n, 0.5, 30.0) for n in range(1, 10)]
    assert schedule == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff_s(10_000, 0.5, 30.0) == 30.0


def test_backoff_jitter_scales_within_half_to_full() -> None:
    assert backoff_s(3, 0.5, 30.0, jitter=0.5) == 1.0
    assert backoff_s(7, 0.5, 30.0, jitter=0.75) == 22.5
    with pytest.raises(ValueError, match="jitter"):
        backoff_s(1, 0.5, 30.0, jitter=0.2)
    with pytest.raises(ValueError, match="attempt"):
        backoff_s(0, 0.5, 30.0)


def test_jittered_backoff_stays_within_half_to_full_of_the_schedule() -> None:
    for attempt in range(1, 12):
        full = backoff_s(attempt, 0.2, 5.0)
        for _ in range(50):
            assert full / 2 <= jittered_backoff_s(attempt, 0.2, 5.0) <= full


def test_every_sink_reports_failures_as_one_kind_of_error() -> None:
    store = StoreError("insert failed: Code: 209.", transient=True, code=209)
    forward = ForwardError("HTTP 503", transient=True, retry_after_s=2.0)
    permanent = StoreError("bad SQL", transient=False)
    assert all(isinstance(e, CollectorError) for e in (store, forward, permanent))
    assert (store.transient, store.code, store.retry_after_s) == (True, 209, None)
    assert (forward.transient, forward.retry_after_s) == (True, 2.0)
    assert not permanent.transient
