"""The clock exchange: offset estimation, the header, the ASGI side and the skew switch."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tokentrace.instrument import clock
from tokentrace.instrument.asgi import ArrivalStampMiddleware
from tokentrace.instrument.clock import (
    CLOCK_HEADER,
    OffsetEstimator,
    format_clock_header,
    parse_clock_header,
)
from tokentrace.instrument.tracing import SkewedExporter

MS = 1_000_000


def _exchange(
    est: OffsetEstimator, t0: int, offset: int, there: int, work: int, back: int, at: float
) -> tuple[int, int, int, int]:
    t1 = t0 + there + offset
    t2 = t1 + work
    t3 = t0 + there + work + back
    assert est.add(t0, t1, t2, t3, at_s=at)
    return t0, t1, t2, t3


def test_estimate_is_consistent_with_every_exchange_and_bounds_its_error() -> None:
    rng = random.Random(7)
    est = OffsetEstimator(window_s=30)
    offset = 80 * MS
    exchanges = []
    for i in range(200):
        # Queueing delays from 100 µs up to 20 ms each way, most of them lopsided.
        there, back = rng.randint(100_000, 20 * MS), rng.randint(100_000, 20 * MS)
        work = rng.randint(0, 50 * MS)
        exchanges.append(_exchange(est, i * 10 * MS, offset, there, work, back, at=i * 0.01))
    # One quiet exchange: 200 µs there, 300 µs back.
    exchanges.append(_exchange(est, 10**10, offset, 200_000, 5 * MS, 300_000, at=2.0))
    got = est.estimate(at_s=2.0)
    assert got is not None and got.samples == 201
    assert abs(got.offset_s - 0.080) <= got.error_s <= 0.00025  # within the quiet bound
    for t0, t1, t2, t3 in exchanges:
        # On our clock, no peer receives before we sent nor replies after we received.
        assert (t1 - t0) / 1e9 - got.offset_s >= 0
        assert (t3 - t2) / 1e9 + got.offset_s >= 0


def test_window_forgets_old_samples() -> None:
    est = OffsetEstimator(window_s=10)
    _exchange(est, 0, 5 * MS, 100_000, 0, 100_000, at=0.0)  # tight, but will expire
    _exchange(est, 0, 5 * MS, 2 * MS, 0, 2 * MS, at=5.0)
    early, late = est.estimate(at_s=9.0), est.estimate(at_s=12.0)
    assert early is not None and late is not None
    assert (early.offset_s, early.error_s, early.samples) == (0.005, 0.0001, 2)
    assert (late.offset_s, late.error_s, late.samples) == (0.005, 0.002, 1)
    assert est.estimate(at_s=16.0) is None


def test_a_stepped_clock_drops_the_history_it_contradicts() -> None:
    est = OffsetEstimator()
    _exchange(est, 0, 5 * MS, 100_000, 0, 100_000, at=0.0)
    _exchange(est, 0, 50 * MS, 100_000, 0, 100_000, at=1.0)  # the peer's clock jumped
    got = est.estimate(at_s=1.0)
    assert got is not None and got.samples == 1 and got.offset_s == 0.05


def test_a_full_window_drops_its_oldest_samples() -> None:
    est = OffsetEstimator(window_s=100, max_samples=3)
    _exchange(est, 0, 1 * MS, 10_000, 0, 10_000, at=0.0)
    for i in (1, 2, 3):
        _exchange(est, 0, 1 * MS, 500_000 * i, 0, 500_000 * i, at=float(i))
    got = est.estimate(at_s=4.0)
    assert got is not None and got.samples == 3
    assert (got.offset_s, got.error_s) == (0.001, 0.0005)


def test_inconsistent_exchanges_are_ignored() -> None:
    est = OffsetEstimator()
    assert not est.add(10, 5, 4, 20)  # replied before it received
    assert not est.add(10, 0, 50, 20)  # longer inside the peer than the whole round trip
    assert not est.add(10, 0, 1, 5)  # answered before it was sent
    assert est.estimate() is None
    with pytest.raises(ValueError, match="window_s"):
        OffsetEstimator(window_s=0)


def test_header_round_trip_and_malformed_values() -> None:
    reply = parse_clock_header(format_clock_header(5, 9, "decode-0;x=y"))
    assert reply is not None and (reply.t1_ns, reply.t2_ns, reply.node) == (5, 9, "decode-0;x=y")
    assert parse_clock_header(format_clock_header(5, 9)).node == ""  # type: ignore[union-attr]
    for bad in (None, "", "t1=5", "t1=5;t2=x", "t1=9;t2=5", "garbage", "t1=5;t2"):
        assert parse_clock_header(bad) is None, bad


def test_skew_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    for raw, expected in (("80", 80 * MS), ("-50.5", -50_500_000), ("", 0)):
        monkeypatch.setattr(clock, "_skew_ns", None)
        monkeypatch.setenv(clock.SKEW_ENV, raw)
        assert clock.skew_ns() == expected
    for raw in ("fast", "nan", "inf"):
        monkeypatch.setattr(clock, "_skew_ns", None)
        monkeypatch.setenv(clock.SKEW_ENV, raw)
        with pytest.raises(ValueError, match="TOKENTRACE_CLOCK_SKEW_MS"):
            clock.skew_ns()


def test_skewed_exporter_shifts_span_and_event_times() -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({}))
    provider.add_span_processor(SimpleSpanProcessor(SkewedExporter(memory, -50 * MS)))
    span = provider.get_tracer("t").start_span("s", start_time=1_000 * MS)
    span.add_event("e", timestamp=1_010 * MS)
    span.end(end_time=1_020 * MS)
    (out,) = memory.get_finished_spans()
    assert (out.start_time, out.end_time) == (950 * MS, 970 * MS)
    assert out.events[0].timestamp == 960 * MS
    assert out.context == span.get_span_context() and out.name == "s"


def test_middleware_answers_the_exchange_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock, "_skew_ns", 80 * MS)

    async def app(scope: dict, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    async def call(headers: dict[str, str]) -> httpx.Response:
        transport = httpx.ASGITransport(app=ArrivalStampMiddleware(app, node_id="decode-7"))
        async with httpx.AsyncClient(transport=transport, base_url="http://w") as client:
            return await client.get("/health", headers=headers)

    assert CLOCK_HEADER not in asyncio.run(call({})).headers
    t0 = clock.time.time_ns()
    reply = parse_clock_header(asyncio.run(call({CLOCK_HEADER: "1"})).headers[CLOCK_HEADER])
    t3 = clock.time.time_ns()
    assert reply is not None and reply.node == "decode-7"
    # The worker's times carry its 80 ms skew.
    assert t0 + 80 * MS <= reply.t1_ns <= reply.t2_ns <= t3 + 80 * MS
