"""Hand-built OTLP protobuf requests for the collector's unit tests."""

from __future__ import annotations

from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

TRACE_ID = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
T0_NS = 1_700_000_000_123_456_789


def any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    if isinstance(value, dict):
        return AnyValue(kvlist_value=KeyValueList(values=key_values(value)))
    return AnyValue(string_value=str(value))


def fill_nested(target: AnyValue, levels: int, kind: str = "array") -> AnyValue:
    """Make ``target`` a string inside arrays (``kind="array"``) or key-value lists
    (``"kvlist"``), ``levels`` levels deep in all (a bare string is 1), and return it.
    Built in place, never copied: copying parses, and the parser refuses deep nesting."""
    value = target
    for _ in range(levels - 1):
        if kind == "array":
            value = value.array_value.values.add()
        else:
            value = value.kvlist_value.values.add(key="k").value
    value.string_value = "leaf"
    return target


def key_values(attrs: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()]


def span(
    name: str,
    span_id: int,
    start_ns: int,
    end_ns: int,
    attrs: dict[str, Any] | None = None,
    *,
    trace_id: bytes = TRACE_ID,
    parent_id: int | None = None,
    kind: int = Span.SPAN_KIND_INTERNAL,
    error: bool = False,
) -> Span:
    return Span(
        trace_id=trace_id,
        span_id=span_id.to_bytes(8, "big"),
        parent_span_id=parent_id.to_bytes(8, "big") if parent_id else b"",
        name=name,
        kind=kind,  # type: ignore[arg-type]
        start_time_unix_nano=start_ns,
        end_time_unix_nano=end_ns,
        attributes=key_values(attrs or {}),
        status=Status(code=Status.STATUS_CODE_ERROR if error else Status.STATUS_CODE_UNSET),
    )


def request(
    resource: dict[str, Any], spans: list[Span], scope: str = "tokentrace.test"
) -> ExportTraceServiceRequest:
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=key_values(resource)),
                scope_spans=[
                    ScopeSpans(scope=InstrumentationScope(name=scope, version="1.0"), spans=spans)
                ],
            )
        ]
    )


def packed_and_unpacked(
    step_prefill: bool = True, counts: tuple[int, ...] = (1, 1, 3, 1, 2)
) -> tuple[ExportTraceServiceRequest, ExportTraceServiceRequest]:
    """The same recorded emissions (by default five, token counts 1, 1, 3, 1, 2; steps
    that also prefilled 0, 40, 0, 80, 0 prompt tokens) sent both ways through the real
    SDK and OTLP encoder: one llm.token span each under one llm.decode span, and packed
    onto another llm.decode span (each its own trace). ``step_prefill=False`` records
    them as an emitter that cannot know the prefill counts (packed version 1)."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tokentrace.instrument.recorder import TokenRecorder
    from tokentrace.schemas import attributes as A

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({A.NODE_ID: "decode-0"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("tokentrace")
    rec = TokenRecorder(2, step_prefill=step_prefill)
    rec.start()
    for step, tokens in enumerate(counts):
        rec.record(tokens, 100 + step, 7 - step, 40 * step if step % 2 else 0)
    n = len(counts)
    for packed in (False, True):
        decode = tracer.start_span(A.SPAN_DECODE, attributes={A.REQUEST_ID: "r"})
        assert rec.emit(tracer, decode, packed) == n
        decode.end()
    spans = memory.get_finished_spans()
    return encode_spans(spans[: n + 1]), encode_spans([spans[n + 1]])
