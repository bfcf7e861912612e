"""Pure conversions of :class:`~.rows.SpanRow`: Jaeger's v1 JSON model
(:func:`to_jaeger_traces`), OTLP-JSON for ``/api/v3`` (:func:`to_otlp_json`) and trace
summaries."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokentrace.schemas import attributes as A

from .rows import SpanRow, group_by_trace, typed_value

_SAFE_INT = 2**53 - 1
_OTLP_KIND = {
    "Unspecified": 0,
    "Internal": 1,
    "Server": 2,
    "Client": 3,
    "Producer": 4,
    "Consumer": 5,
}
_OTLP_STATUS = {"Unset": 0, "Ok": 1, "Error": 2}


# -- attribute values ------------------------------------------------------------------


def _jaeger_kv(key: str, typ: str, value: Any) -> dict[str, Any]:
    if typ == "int64" and not -_SAFE_INT <= value <= _SAFE_INT:
        value = str(value)  # beyond JavaScript's safe integers, as Jaeger sends them
    return {"key": key, "type": typ, "value": value}


def _jaeger_tags(attributes: Mapping[str, str]) -> list[dict[str, Any]]:
    return [_jaeger_kv(k, *typed_value(v)) for k, v in attributes.items()]


def _otlp_any(raw: str) -> dict[str, Any]:
    typ, value = typed_value(raw)
    if typ == "bool":
        return {"boolValue": value}
    if typ == "int64":
        return {"intValue": str(value)}
    if typ == "float64":
        return {"doubleValue": value}
    return {"stringValue": raw}


def _otlp_attrs(attributes: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"key": k, "value": _otlp_any(v)} for k, v in attributes.items()]


# -- v1 (Jaeger JSON model) ------------------------------------------------------------


def _span_tags(row: SpanRow) -> list[dict[str, Any]]:
    """Span attributes plus the tags Jaeger's OTLP translator adds."""
    tags = _jaeger_tags(row.attributes)
    if row.scope_name:
        tags.append(_jaeger_kv("otel.scope.name", "string", row.scope_name))
    if row.scope_version:
        tags.append(_jaeger_kv("otel.scope.version", "string", row.scope_version))
    if row.kind not in ("", "Unspecified"):
        tags.append(_jaeger_kv("span.kind", "string", row.kind.lower()))
    if row.status_code == "Error":
        tags.append(_jaeger_kv("otel.status_code", "string", "ERROR"))
        if "error" not in row.attributes:
            tags.append(_jaeger_kv("error", "bool", True))
    elif row.status_code == "Ok":
        tags.append(_jaeger_kv("otel.status_code", "string", "OK"))
    if row.status_message:
        tags.append(_jaeger_kv("otel.status_description", "string", row.status_message))
    if row.trace_state:
        tags.append(_jaeger_kv("w3c.tracestate", "string", row.trace_state))
    return tags


def _clock_warning(row: SpanRow) -> list[str] | None:
    adjusted = row.attributes.get(A.CLOCK_ADJUSTMENT_US)
    if adjusted is None:
        return None
    return [f"clock skew adjustment: moved by {adjusted} µs onto the router's clock"]


def _process_key(row: SpanRow) -> tuple[str, tuple[tuple[str, str], ...]]:
    return row.service_name, tuple(sorted(row.resource_attributes.items()))


def to_jaeger_trace(rows: Sequence[SpanRow]) -> dict[str, Any]:
    """One trace (all ``rows`` share a trace id) in Jaeger's v1 JSON model."""
    processes: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
    process_json: dict[str, dict[str, Any]] = {}
    spans = []
    for row in rows:
        key = _process_key(row)
        pid = processes.get(key)
        if pid is None:
            pid = processes[key] = f"p{len(processes) + 1}"
            process_json[pid] = {
                "serviceName": row.service_name,
                "tags": _jaeger_tags(
                    {k: v for k, v in row.resource_attributes.items() if k != "service.name"}
                ),
            }
        references = []
        if row.parent_span_id:
            references.append(
                {"refType": "CHILD_OF", "traceID": row.trace_id, "spanID": row.parent_span_id}
            )
        references.extend(
            {"refType": "FOLLOWS_FROM", "traceID": link.trace_id, "spanID": link.span_id}
            for link in row.links
        )
        spans.append(
            {
                "traceID": row.trace_id,
                "spanID": row.span_id,
                "operationName": row.name,
                "references": references,
                "startTime": row.start_ns // 1000,
                "duration": row.duration_ns // 1000,
                "tags": _span_tags(row),
                "logs": [
                    {
                        "timestamp": event.time_ns // 1000,
                        "fields": [
                            _jaeger_kv("event", "string", event.name),
                            *_jaeger_tags(event.attributes),
                        ],
                    }
                    for event in row.events
                ],
                "processID": pid,
                "warnings": _clock_warning(row),
            }
        )
    return {
        "traceID": rows[0].trace_id if rows else "",
        "spans": spans,
        "processes": process_json,
        "warnings": None,
    }


def to_jaeger_traces(rows: Iterable[SpanRow]) -> list[dict[str, Any]]:
    """Rows of any number of traces as Jaeger v1 traces, in first-seen trace order."""
    return [to_jaeger_trace(spans) for spans in group_by_trace(rows).values()]


# -- v3 (OTLP-JSON) --------------------------------------------------------------------


def _otlp_span(row: SpanRow) -> dict[str, Any]:
    span: dict[str, Any] = {"traceId": row.trace_id, "spanId": row.span_id}
    if row.trace_state:
        span["traceState"] = row.trace_state
    if row.parent_span_id:
        span["parentSpanId"] = row.parent_span_id
    span["name"] = row.name
    kind = _OTLP_KIND.get(row.kind, 0)
    if kind:
        span["kind"] = kind
    span["startTimeUnixNano"] = str(row.start_ns)
    span["endTimeUnixNano"] = str(row.start_ns + row.duration_ns)
    if row.attributes:
        span["attributes"] = _otlp_attrs(row.attributes)
    if row.events:
        span["events"] = [
            {"timeUnixNano": str(e.time_ns), "name": e.name}
            | ({"attributes": _otlp_attrs(e.attributes)} if e.attributes else {})
            for e in row.events
        ]
    if row.links:
        span["links"] = [
            {"traceId": link.trace_id, "spanId": link.span_id}
            | ({"traceState": link.trace_state} if link.trace_state else {})
            | ({"attributes": _otlp_attrs(link.attributes)} if link.attributes else {})
            for link in row.links
        ]
    status: dict[str, Any] = {}
    if row.status_message:
        status["message"] = row.status_message
    if _OTLP_STATUS.get(row.status_code, 0):
        status["code"] = _OTLP_STATUS[row.status_code]
    span["status"] = status
    return span


def to_otlp_json(rows: Iterable[SpanRow]) -> dict[str, Any]:
    """Rows as OTLP-JSON ``TracesData`` (``{"resourceSpans": [...]}``): hex ids, enums as
    ints, 64-bit integers as strings; spans grouped by resource, then by scope."""
    resources: dict[Any, dict[Any, list[dict[str, Any]]]] = {}
    resource_attrs: dict[Any, Mapping[str, str]] = {}
    for row in rows:
        rkey = _process_key(row)
        resource_attrs.setdefault(rkey, row.resource_attributes)
        scopes = resources.setdefault(rkey, {})
        scopes.setdefault((row.scope_name, row.scope_version), []).append(_otlp_span(row))
    out = []
    for rkey, scopes in resources.items():
        attrs = resource_attrs[rkey]
        resource = {"attributes": _otlp_attrs(attrs)} if attrs else {}
        scope_spans = []
        for (name, version), spans in scopes.items():
            scope = ({"name": name} if name else {}) | ({"version": version} if version else {})
            scope_spans.append({"scope": scope, "spans": spans})
        out.append({"resource": resource, "scopeSpans": scope_spans})
    return {"resourceSpans": out}


def trace_summaries(rows: Iterable[SpanRow]) -> list[dict[str, Any]]:
    """One summary per trace, shaped as Jaeger's ``/api/v3/trace-summaries``."""
    out = []
    for trace_id, spans in group_by_trace(rows).items():
        ids = {s.span_id for s in spans}
        roots = [s for s in spans if not s.parent_span_id or s.parent_span_id not in ids]
        root = min(roots or spans, key=lambda s: (bool(s.parent_span_id), s.start_ns))
        services: dict[str, dict[str, Any]] = {}
        for s in spans:
            entry = services.setdefault(
                s.service_name, {"name": s.service_name, "spanCount": 0, "errorSpanCount": 0}
            )
            entry["spanCount"] += 1
            entry["errorSpanCount"] += s.status_code == "Error"
        out.append(
            {
                "traceId": trace_id,
                "rootServiceName": root.service_name,
                "rootOperationName": root.name,
                "minStartTimeUnixNano": str(min(s.start_ns for s in spans)),
                "maxEndTimeUnixNano": str(max(s.start_ns + s.duration_ns for s in spans)),
                "spanCount": len(spans),
                "errorSpanCount": sum(s.status_code == "Error" for s in spans),
                "services": [services[name] for name in sorted(services)],
            }
        )
    return out
