"""Row → Jaeger v1 / OTLP-JSON conversions and parameter parsing, on hand-built rows."""

from __future__ import annotations

import pytest

from tokentrace.collector.query.jaeger import (
    SpanEvent,
    SpanLink,
    SpanRow,
    normalize_trace_id,
    parse_duration_ns,
    to_jaeger_traces,
    to_otlp_json,
    trace_summaries,
    typed_value,
)

TID = "0af7651916cd43dd8448eb211c80319c"
T0_NS = 1_700_000_000_123_456_789


def _rows() -> list[SpanRow]:
    root = SpanRow(
        trace_id=TID,
        span_id="00f067aa0ba902b7",
        name="GET /chat",
        start_ns=T0_NS,
        duration_ns=50_000_999,
        service_name="front",
        kind="Server",
        resource_attributes={"service.name": "front", "node.rank": "3"},
        scope_name="tt",
        scope_version="1.0",
        attributes={
            "s": "text",
            "i": "42",
            "neg": "-7",
            "big": str(2**60),
            "f": "0.25",
            "exp": "1e-05",
            "b": "true",
            "lead": "007",
            "huge": str(2**64),
            "arr": "[1,2]",
        },
        status_code="Ok",
    )
    child = SpanRow(
        trace_id=TID,
        span_id="b7ad6b7169203331",
        parent_span_id="00f067aa0ba902b7",
        name="generate",
        start_ns=T0_NS + 3_000_000,
        duration_ns=37_000_000,
        service_name="back",
        kind="Client",
        resource_attributes={"service.name": "back"},
        attributes={"ok": "false"},
        status_code="Error",
        status_message="out of blocks",
        trace_state="k=v",
        events=(SpanEvent(T0_NS + 10_000_000, "first token", {"token.index": "0"}),),
        links=(SpanLink("1" * 32, "2" * 16, "", {"why": "retry"}),),
    )
    again = SpanRow(
        trace_id=TID,
        span_id="c7ad6b7169203331",
        parent_span_id="00f067aa0ba902b7",
        name="again",
        start_ns=T0_NS + 45_000_000,
        duration_ns=1_000,
        service_name="front",
        resource_attributes={"node.rank": "3", "service.name": "front"},
    )
    return [root, child, again]


def test_typed_value() -> None:
    assert typed_value("true") == ("bool", True) and typed_value("false") == ("bool", False)
    assert typed_value("42") == ("int64", 42) and typed_value("-7") == ("int64", -7)
    assert typed_value("0.25") == ("float64", 0.25) and typed_value("1e-05") == ("float64", 1e-05)
    assert typed_value("1.5e+20") == ("float64", 1.5e20)
    for raw in ("007", "text", "", "nan", "inf", "True", str(2**64), "1.", "[1,2]"):
        assert typed_value(raw) == ("string", raw)


def test_v1_trace_tags_references_processes_and_microseconds() -> None:
    (trace,) = to_jaeger_traces(_rows())
    assert set(trace) == {"traceID", "spans", "processes", "warnings"}
    assert trace["traceID"] == TID and trace["warnings"] is None
    root, child, again = trace["spans"]
    assert set(root) == {
        "traceID",
        "spanID",
        "operationName",
        "references",
        "startTime",
        "duration",
        "tags",
        "logs",
        "processID",
        "warnings",
    }
    assert root["startTime"] == T0_NS // 1000 and root["duration"] == 50_000
    assert root["references"] == [] and root["logs"] == [] and root["warnings"] is None
    tags = {t["key"]: (t["type"], t["value"]) for t in root["tags"]}
    assert tags == {
        "s": ("string", "text"),
        "i": ("int64", 42),
        "neg": ("int64", -7),
        "big": ("int64", str(2**60)),
        "f": ("float64", 0.25),
        "exp": ("float64", 1e-05),
        "b": ("bool", True),
        "lead": ("string", "007"),
        "huge": ("string", str(2**64)),
        "arr": ("string", "[1,2]"),
        "otel.scope.name": ("string", "tt"),
        "otel.scope.version": ("string", "1.0"),
        "span.kind": ("string", "server"),
        "otel.status_code": ("string", "OK"),
    }
    assert child["references"] == [
        {"refType": "CHILD_OF", "traceID": TID, "spanID": "00f067aa0ba902b7"},
        {"refType": "FOLLOWS_FROM", "traceID": "1" * 32, "spanID": "2" * 16},
    ]
    child_tags = {t["key"]: (t["type"], t["value"]) for t in child["tags"]}
    assert child_tags["ok"] == ("bool", False)
    assert child_tags["error"] == ("bool", True)
    assert child_tags["otel.status_code"] == ("string", "ERROR")
    assert child_tags["otel.status_description"] == ("string", "out of blocks")
    assert child_tags["w3c.tracestate"] == ("string", "k=v")
    assert child_tags["span.kind"] == ("string", "client")
    assert child["logs"] == [
        {
            "timestamp": (T0_NS + 10_000_000) // 1000,
            "fields": [
                {"key": "event", "type": "string", "value": "first token"},
                {"key": "token.index", "type": "int64", "value": 0},
            ],
        }
    ]
    # Same service and resource (in any key order) → same process.
    assert (root["processID"], child["processID"], again["processID"]) == ("p1", "p2", "p1")
    assert trace["processes"] == {
        "p1": {"serviceName": "front", "tags": [{"key": "node.rank", "type": "int64", "value": 3}]},
        "p2": {"serviceName": "back", "tags": []},
    }
    assert not any(t["key"] == "span.kind" for t in again["tags"])  # Unspecified


def test_otlp_json_groups_by_resource_and_scope() -> None:
    doc = to_otlp_json(_rows())
    assert [len(rs["scopeSpans"]) for rs in doc["resourceSpans"]] == [2, 1]
    front, back = doc["resourceSpans"]
    assert front["resource"]["attributes"] == [
        {"key": "service.name", "value": {"stringValue": "front"}},
        {"key": "node.rank", "value": {"intValue": "3"}},
    ]
    assert front["scopeSpans"][0]["scope"] == {"name": "tt", "version": "1.0"}
    assert front["scopeSpans"][1]["scope"] == {}
    root = front["scopeSpans"][0]["spans"][0]
    assert root["kind"] == 2 and root["status"] == {"code": 1}
    assert root["startTimeUnixNano"] == str(T0_NS)
    assert root["endTimeUnixNano"] == str(T0_NS + 50_000_999)
    attrs = {a["key"]: a["value"] for a in root["attributes"]}
    assert attrs["big"] == {"intValue": str(2**60)} and attrs["f"] == {"doubleValue": 0.25}
    assert attrs["b"] == {"boolValue": True} and attrs["lead"] == {"stringValue": "007"}
    assert "parentSpanId" not in root
    child = back["scopeSpans"][0]["spans"][0]
    assert child["parentSpanId"] == "00f067aa0ba902b7" and child["traceState"] == "k=v"
    assert child["status"] == {"code": 2, "message": "out of blocks"}
    assert child["events"] == [
        {
            "timeUnixNano": str(T0_NS + 10_000_000),
            "name": "first token",
            "attributes": [{"key": "token.index", "value": {"intValue": "0"}}],
        }
    ]
    assert child["links"] == [
        {
            "traceId": "1" * 32,
            "spanId": "2" * 16,
            "attributes": [{"key": "why", "value": {"stringValue": "retry"}}],
        }
    ]


def test_trace_summaries() -> None:
    assert trace_summaries(_rows()) == [
        {
            "traceId": TID,
            "rootServiceName": "front",
            "rootOperationName": "GET /chat",
            "minStartTimeUnixNano": str(T0_NS),
            "maxEndTimeUnixNano": str(T0_NS + 50_000_999),
            "spanCount": 3,
            "errorSpanCount": 1,
            "services": [
                {"name": "back", "spanCount": 1, "errorSpanCount": 1},
                {"name": "front", "spanCount": 2, "errorSpanCount": 0},
            ],
        }
    ]


def test_parse_duration_ns() -> None:
    assert parse_duration_ns("10ms") == 10_000_000
    assert parse_duration_ns("1.5s") == 1_500_000_000
    assert parse_duration_ns("1h2m") == 3_720_000_000_000
    assert parse_duration_ns("250us") == parse_duration_ns("250µs") == 250_000
    assert parse_duration_ns("0") == 0
    for bad in ("", "10", "ten", "1.5", "-1s", "5 ms", "1d"):
        with pytest.raises(ValueError):
            parse_duration_ns(bad)


def test_normalize_trace_id() -> None:
    assert normalize_trace_id(TID.upper()) == TID
    assert normalize_trace_id("abc") == "0" * 29 + "abc"
    for bad in ("", "x" * 32, "1" * 33, "' OR 1=1 --"):
        with pytest.raises(ValueError):
            normalize_trace_id(bad)
