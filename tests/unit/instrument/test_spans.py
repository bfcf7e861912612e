"""The span conventions (instrument/spans.py) through the OpenTelemetry SDK: each span
has its name, kind, parent and attributes; and no emitter builds an llm.* span itself."""

from __future__ import annotations

import re
from pathlib import Path

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tokentrace.instrument import spans
from tokentrace.schemas import attributes as A

ROOT = Path(__file__).resolve().parents[3]
T0 = 1_700_000_000_000_000_000
MS = 1_000_000


def _tracer() -> tuple[trace.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def test_a_request_through_prefill_transfer_and_decode() -> None:
    tracer, exporter = _tracer()
    request = spans.start_request(tracer, Context(), T0, "req-1", chat=True)
    parent = trace.set_span_in_context(request)
    attrs = spans.request_attributes("req-1", 12, max_tokens=4, model="m")
    prefill = spans.start_prefill(tracer, parent, T0 + MS, attrs)
    spans.set_stage_times(prefill, 0.001, 0.002)
    prefill.end(end_time=T0 + 4 * MS)
    decode = spans.start_decode(tracer, parent, T0 + 5 * MS, attrs)
    in_decode = trace.set_span_in_context(decode)
    spans.kv_transfer(
        tracer, in_decode, T0 + 6 * MS, T0 + 7 * MS,
        bytes_moved=4096, blocks=2, backend="nixl/UCX", src_node="p", dst_node="d",
    )  # fmt: skip
    spans.end_decode(
        decode, output_tokens=4, finish_reason="length", ttft_s=0.003, error=None,
        end_ns=T0 + 9 * MS,
    )  # fmt: skip
    spans.end_request(
        request, status=200, input_tokens=12, output_tokens=4, ttft_s=0.004, e2e_s=0.009,
        finish_reasons=["length"], error=None,
    )  # fmt: skip
    got = {s.name: s for s in exporter.get_finished_spans()}
    assert {n: s.kind for n, s in got.items()} == {
        A.SPAN_REQUEST: SpanKind.SERVER,
        A.SPAN_PREFILL: SpanKind.SERVER,
        A.SPAN_KV_TRANSFER: SpanKind.CLIENT,
        A.SPAN_DECODE: SpanKind.SERVER,
    }
    root = got[A.SPAN_REQUEST].context.span_id
    assert got[A.SPAN_PREFILL].parent.span_id == root  # type: ignore[union-attr]
    assert got[A.SPAN_DECODE].parent.span_id == root  # type: ignore[union-attr]
    kv = got[A.SPAN_KV_TRANSFER]
    assert kv.parent.span_id == got[A.SPAN_DECODE].context.span_id  # type: ignore[union-attr]
    assert dict(kv.attributes or {}) == {
        A.KV_BYTES: 4096, A.KV_BLOCKS: 2, A.KV_BACKEND: "nixl/UCX",
        A.KV_SRC_NODE: "p", A.KV_DST_NODE: "d",
    }  # fmt: skip
    assert dict(got[A.SPAN_PREFILL].attributes or {}) == {
        A.REQUEST_ID: "req-1", A.GEN_AI_USAGE_INPUT_TOKENS: 12,
        A.GEN_AI_REQUEST_MAX_TOKENS: 4, A.GEN_AI_REQUEST_MODEL: "m",
        A.QUEUE_TIME_S: 0.001, A.COMPUTE_TIME_S: 0.002,
    }  # fmt: skip
    decode_attrs = dict(got[A.SPAN_DECODE].attributes or {})
    assert decode_attrs[A.GEN_AI_USAGE_OUTPUT_TOKENS] == 4
    assert decode_attrs[A.GEN_AI_RESPONSE_FINISH_REASONS] == ("length",)
    assert decode_attrs[A.GEN_AI_SERVER_TTFT] == 0.003
    assert got[A.SPAN_DECODE].end_time == T0 + 9 * MS
    request_attrs = dict(got[A.SPAN_REQUEST].attributes or {})
    assert request_attrs[A.GEN_AI_OPERATION_NAME] == "chat"
    assert request_attrs[A.E2E_S] == 0.009 and request_attrs[A.HTTP_STATUS] == 200


def test_failures_are_error_status_with_the_message() -> None:
    tracer, exporter = _tracer()
    spans.kv_transfer(
        tracer, Context(), T0, T0 + MS, bytes_moved=0, blocks=1, backend="b",
        error=RuntimeError("peer gone"),
    )  # fmt: skip
    decode = spans.start_decode(tracer, Context(), T0, spans.request_attributes("r", 1))
    spans.end_decode(
        decode, output_tokens=0, finish_reason="abort", ttft_s=None, error="aborted", end_ns=None
    )
    kv, dec = exporter.get_finished_spans()
    assert kv.status.status_code == StatusCode.ERROR and kv.status.description == "peer gone"
    assert [e.name for e in kv.events] == ["exception"]
    assert dec.status.status_code == StatusCode.ERROR and dec.status.description == "aborted"
    assert A.GEN_AI_SERVER_TTFT not in (dec.attributes or {})


def test_no_emitter_builds_an_llm_span_itself() -> None:
    """Only the conventions module (and the token recorder, for llm.token) start spans."""
    homes = {ROOT / "instrument" / "spans.py", ROOT / "instrument" / "recorder.py"}
    for path in sorted([*(ROOT / "serving").rglob("*.py"), *(ROOT / "instrument").rglob("*.py")]):
        if path in homes:
            continue
        text = path.read_text()
        assert not re.search(r"\.start_(as_current_)?span\(", text), path.relative_to(ROOT)
