"""The token recorder and propagation, with the OpenTelemetry SDK's in-memory exporter
standing where the OTLP exporter would (the SDK is not what is under test)."""

from __future__ import annotations

import time
from array import array

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tokentrace.instrument import TokenRecorder, extract, inject, setup_tracing
from tokentrace.schemas import attributes as A


@pytest.fixture
def tracer_and_spans() -> tuple[trace.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def test_one_span_per_emission_chained_from_decode_start(tracer_and_spans) -> None:
    tracer, exporter = tracer_and_spans
    rec = TokenRecorder(capacity=2)  # grows past its capacity
    rec.start()
    counts = [1, 3, 1, 2, 1]
    for step, n in enumerate(counts):
        time.sleep(0.002)
        rec.record(n, step + 10, batch_size=4, prefill_tokens=100 * (step % 2))
    parent = tracer.start_span("llm.decode")
    assert rec.emit_spans(tracer, trace.set_span_in_context(parent)) == len(counts)
    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    assert [s.name for s in spans] == [A.SPAN_TOKEN] * len(counts)
    assert rec.tokens == sum(counts) and rec.emissions == len(counts)
    # token index = tokens emitted before this emission
    assert [s.attributes[A.TOKEN_INDEX] for s in spans] == [0, 1, 4, 5, 7]
    assert [s.attributes[A.TOKEN_COUNT] for s in spans] == counts
    assert [s.attributes[A.ENGINE_STEP] for s in spans] == [10, 11, 12, 13, 14]
    assert all(s.attributes[A.BATCH_SIZE] == 4 for s in spans)
    assert [s.attributes[A.STEP_PREFILL_TOKENS] for s in spans] == [0, 100, 0, 100, 0]
    # contiguous: each span starts where the previous ended; the first at decode start
    assert spans[0].start_time == rec.wall_ns(rec.start_mono_ns)
    for a, b in zip(spans, spans[1:], strict=False):
        assert b.start_time == a.end_time
    for i, s in enumerate(spans):
        assert s.end_time == rec.emission_wall_ns(i)
        assert s.end_time - s.start_time >= 1_500_000  # the 2 ms sleeps
        assert s.parent is not None and s.parent.span_id == parent.get_span_context().span_id
        assert s.kind == trace.SpanKind.INTERNAL
    first = rec.first_emission_s()
    assert first is not None and first >= 0.0015


def test_packs_prefill_counts_unless_the_emitter_cannot_know_them(tracer_and_spans) -> None:
    """The engine's recorder packs version 2 with each step's prefill count; one made
    with ``step_prefill=False`` (the vLLM plugin's) packs version 1 and its spans carry
    no count, so the collector stores the count as unknown instead of 0."""
    from tokentrace.schemas.packed import decode_packed

    tracer, exporter = tracer_and_spans
    known, unknown = TokenRecorder(4), TokenRecorder(4, step_prefill=False)
    for rec in (known, unknown):
        rec.start()
        rec.record(1, 7, 2, 300)
        rec.record(1, 8, 2)
    assert decode_packed(known.pack(0)).prefill_tokens == array("I", [300, 0])
    assert unknown.pack(0).startswith("1:")
    assert decode_packed(unknown.pack(0)).prefill_tokens is None
    unknown.emit_spans(tracer, trace.set_span_in_context(trace.INVALID_SPAN))
    spans = exporter.get_finished_spans()
    assert len(spans) == 2
    assert all(A.STEP_PREFILL_TOKENS not in (s.attributes or {}) for s in spans)


def test_request_without_emissions_builds_no_spans(tracer_and_spans) -> None:
    tracer, exporter = tracer_and_spans
    rec = TokenRecorder(capacity=8)
    rec.start()
    assert rec.emit_spans(tracer, trace.set_span_in_context(trace.INVALID_SPAN)) == 0
    assert rec.first_emission_s() is None
    assert exporter.get_finished_spans() == ()
    with pytest.raises(IndexError):
        rec.emission_wall_ns(0)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        TokenRecorder(0)


def test_traceparent_round_trips_through_kv_transfer_params(tracer_and_spans) -> None:
    tracer, _ = tracer_and_spans
    span = tracer.start_span("llm.prefill")
    params: dict[str, object] = {"remote_block_ids": [1, 2], "do_remote_prefill": True}
    inject(params, trace.set_span_in_context(span))
    assert isinstance(params["traceparent"], str)
    ctx = trace.get_current_span(extract(params)).get_span_context()
    assert ctx.trace_id == span.get_span_context().trace_id
    assert ctx.span_id == span.get_span_context().span_id
    assert ctx.is_remote
    # headers are matched case-insensitively; junk yields an empty context
    headers = {"TraceParent": params["traceparent"]}
    assert trace.get_current_span(extract(headers)).get_span_context().is_valid
    assert not trace.get_current_span(extract({"traceparent": "junk"})).get_span_context().is_valid
    assert not trace.get_current_span(extract(None)).get_span_context().is_valid


def test_tracing_is_a_noop_without_an_endpoint(monkeypatch_free_env) -> None:
    tracing = setup_tracing("decode", node_id="n1")
    assert not tracing.enabled
    ran: list[int] = []
    tracing.defer(lambda: ran.append(1))  # inline when off
    assert ran == [1]
    tracing.shutdown()
    tracing.shutdown()  # idempotent


def test_bad_role_is_rejected() -> None:
    with pytest.raises(ValueError, match="role"):
        setup_tracing("mystery", node_id="n1")


@pytest.fixture
def monkeypatch_free_env():
    """Run with no OTLP endpoint in the environment (restored afterwards)."""
    import os

    saved = {
        k: os.environ.pop(k)
        for k in list(os.environ)
        if k in ("TOKENTRACE_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    }
    try:
        yield
    finally:
        os.environ.update(saved)
