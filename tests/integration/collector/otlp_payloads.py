"""OTLP requests built span by span, and the ways to send them to a running collector,
for the hostile-input and property tests.

Spans are built from the protobuf classes directly (the SDK would refuse to make most
of the broken ones). Every helper that sends returns what the collector answered, never
raises for a refusal: the tests assert on the status.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
PROTOBUF = "application/x-protobuf"
HOUR_NS = 3600 * 1_000_000_000


def new_trace_id() -> bytes:
    """A trace id no other test (or earlier run against the same store) has used."""
    return os.urandom(15) + b"\x01"  # never all zeros


def value(v: Any) -> AnyValue:
    """``v`` as an OTLP AnyValue: bool, int, float, bytes, str, list or dict."""
    out = AnyValue()
    if isinstance(v, bool):
        out.bool_value = v
    elif isinstance(v, int):
        out.int_value = v
    elif isinstance(v, float):
        out.double_value = v
    elif isinstance(v, bytes):
        out.bytes_value = v
    elif isinstance(v, list):
        out.array_value.values.extend(value(x) for x in v)
    elif isinstance(v, dict):
        out.kvlist_value.values.extend(KeyValue(key=k, value=value(x)) for k, x in v.items())
    else:
        out.string_value = str(v)
    return out


def span(
    trace_id: bytes,
    span_id: int,
    start_ns: int,
    end_ns: int,
    name: str = "hostile.test",
    attrs: dict[str, Any] | None = None,
) -> Span:
    out = Span(
        trace_id=trace_id,
        span_id=span_id.to_bytes(8, "big"),
        name=name,
        kind=Span.SPAN_KIND_INTERNAL,
        start_time_unix_nano=start_ns,
        end_time_unix_nano=end_ns,
    )
    out.attributes.extend(KeyValue(key=k, value=value(v)) for k, v in (attrs or {}).items())
    return out


def request(*resources: tuple[dict[str, Any], list[Span]]) -> ExportTraceServiceRequest:
    """One ResourceSpans (with one scope) per ``(resource attributes, spans)``."""
    out = ExportTraceServiceRequest()
    for attrs, spans in resources:
        rs = ResourceSpans()
        rs.resource.attributes.extend(KeyValue(key=k, value=value(v)) for k, v in attrs.items())
        scope = rs.scope_spans.add()
        scope.scope.name = "tokentrace.hostile"
        scope.spans.extend(spans)
        out.resource_spans.append(rs)
    return out


def nest(target: AnyValue, levels: int, kind: str) -> None:
    """Make ``target`` a string inside ``kind`` ("array" or "kvlist") values, ``levels``
    levels in all, in place: copying a deep value parses it, which refuses deep ones."""
    for _ in range(levels - 1):
        if kind == "array":
            target = target.array_value.values.add()
        else:
            target = target.kvlist_value.values.add(key="k").value
    target.string_value = "leaf"


def to_json(req: ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON: proto3 JSON but with trace and span ids in hex."""
    doc = json_format.MessageToDict(req)
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                for obj in (s, *s.get("links", [])):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        if key in obj:
                            obj[key] = base64.b64decode(obj[key]).hex()
    return json.dumps(doc).encode()


@dataclass(frozen=True)
class Answer:
    """What the collector said to one export. ``status`` is the HTTP status (over gRPC:
    200 for OK, 0 for an error, whose code is ``grpc_code``); ``message`` the refusal's
    message or the partial success's error message; ``rejected_spans`` the partial
    success's count (0 when absent)."""

    status: int
    message: str
    rejected_spans: int
    grpc_code: grpc.StatusCode | None = None


def post(url: str, body: bytes, content_type: str = PROTOBUF, **headers: str) -> Answer:
    """POST an export to OTLP/HTTP; decodes the answer in the encoding sent."""
    response = httpx.post(
        url, content=body, headers={"content-type": content_type, **headers}, timeout=60
    )
    if response.status_code != 200:
        return Answer(response.status_code, str(response.json()["message"]), 0)
    if content_type == PROTOBUF:
        parsed = ExportTraceServiceResponse.FromString(response.content)
        partial = parsed.partial_success
        return Answer(200, partial.error_message, partial.rejected_spans)
    doc = response.json().get("partialSuccess", {})
    return Answer(200, doc.get("errorMessage", ""), int(doc.get("rejectedSpans", 0)))


def export_grpc(target: str, body: bytes) -> Answer:
    """Export raw protobuf bytes over OTLP/gRPC (the client sends any size)."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(target, options=options) as channel:
        export = channel.unary_unary(EXPORT_METHOD)  # bytes in, bytes out
        try:
            reply = ExportTraceServiceResponse.FromString(export(body, timeout=60))
        except grpc.RpcError as exc:
            return Answer(0, exc.details() or "", 0, exc.code())
    partial = reply.partial_success
    return Answer(200, partial.error_message, partial.rejected_spans, grpc.StatusCode.OK)


def stored_span_ids(api: str, trace_ids: list[bytes]) -> set[tuple[str, str]]:
    """``(trace id, span id)`` in hex of every span stored under ``trace_ids``."""
    listed = ", ".join(f"'{t.hex()}'" for t in trace_ids)
    body = httpx.post(
        f"{api}/query",
        json={"sql": f"SELECT TraceId, SpanId FROM otel_traces WHERE TraceId IN ({listed})"},
        timeout=60,
    ).json()
    return {(row[0], row[1]) for row in body["rows"]}


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid`` (``VmRSS``), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")
