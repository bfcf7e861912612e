"""The Jaeger-compatible query API of a real ``tokentrace collector`` process.

Traces go in through the OpenTelemetry SDK's OTLP/gRPC exporter (two services, a parent
→ child call across them, span events, attributes of every scalar type); the v1 JSON
API is checked field by field against Jaeger's reference shape, the v3 API by parsing
its OTLP-JSON into ``TracesData``.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from collector_process import start_collector
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

pytestmark = pytest.mark.timeout(60)

REFERENCE = Path("/work/shared/reference/jaeger")
MS = 1_000_000
BIG = 2**60  # beyond JavaScript's safe integers


@dataclass
class Sent:
    """What the SDK sent: trace ids and, per span id, (trace, name, parent, attributes)."""

    t0_ns: int
    main_trace: str = ""
    quick_trace: str = ""
    spans: dict[str, tuple[str, str, str, dict[str, Any]]] = field(default_factory=dict)


@dataclass
class Running:
    proc: subprocess.Popen[str]
    api: str
    sent: Sent


def _send(grpc_endpoint: str) -> Sent:
    t0 = time.time_ns() - 5_000 * MS
    sent = Sent(t0_ns=t0)

    def provider(service: str, extra: dict[str, Any]) -> TracerProvider:
        tp = TracerProvider(resource=Resource.create({"service.name": service, **extra}))
        tp.add_span_processor(
            SimpleSpanProcessor(OTLPSpanExporter(endpoint=grpc_endpoint, insecure=True))
        )
        return tp

    front = provider("jt-front", {"node.rank": 3, "host.name": "box-1"})
    back = provider("jt-back", {"node.rank": 7})

    def record(span: Any, attrs: dict[str, Any]) -> None:
        ctx = span.get_span_context()
        parent = format(span.parent.span_id, "016x") if span.parent else ""
        sent.spans[format(ctx.span_id, "016x")] = (
            format(ctx.trace_id, "032x"),
            span.name,
            parent,
            attrs,
        )

    root_attrs: dict[str, Any] = {
        "http.route": "/chat",
        "req.tokens": 42,
        "req.big": BIG,
        "req.temperature": 0.25,
        "req.stream": True,
    }
    root = front.get_tracer("jt").start_span(
        "GET /chat", kind=SpanKind.SERVER, start_time=t0, attributes=root_attrs
    )
    sent.main_trace = format(root.get_span_context().trace_id, "032x")
    call_attrs = {"peer.service": "jt-back"}
    call = front.get_tracer("jt").start_span(
        "call back",
        context=set_span_in_context(root),
        kind=SpanKind.CLIENT,
        start_time=t0 + 2 * MS,
        attributes=call_attrs,
    )
    gen_attrs = {"gen.tokens": 5, "gen.ok": False}
    gen = back.get_tracer("jt").start_span(
        "generate",
        context=set_span_in_context(call),
        kind=SpanKind.SERVER,
        start_time=t0 + 3 * MS,
        attributes=gen_attrs,
    )
    gen.add_event("first token", {"token.index": 0, "token.text": "hi"}, timestamp=t0 + 10 * MS)
    gen.set_status(Status(StatusCode.ERROR, "out of blocks"))
    gen.end(end_time=t0 + 40 * MS)
    call.end(end_time=t0 + 41 * MS)
    root.end(end_time=t0 + 50 * MS)
    for span, attrs in ((root, root_attrs), (call, call_attrs), (gen, gen_attrs)):
        record(span, attrs)

    quick = front.get_tracer("jt").start_span(
        "GET /health", kind=SpanKind.SERVER, start_time=t0 + 100 * MS
    )
    quick.end(end_time=t0 + 101 * MS)
    sent.quick_trace = format(quick.get_span_context().trace_id, "032x")
    record(quick, {})
    front.shutdown()
    back.shutdown()
    return sent


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    proc, info, _ = start_collector(tmp_path_factory.mktemp("jaeger-data"))
    api = f"http://{info['http']}"
    try:
        sent = _send(info["otlp_grpc"])
        deadline = time.monotonic() + 20
        while True:
            r = httpx.get(f"{api}/api/traces/{sent.main_trace}", timeout=10)
            if r.status_code == 200 and len(r.json()["data"][0]["spans"]) == 3:
                break
            assert time.monotonic() < deadline, f"trace never complete: {r.text}"
            time.sleep(0.1)
        yield Running(proc, api, sent)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def _get(running: Running, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{running.api}{path}", params=params, timeout=10)


def _window(running: Running) -> dict[str, int]:
    return {"start": running.sent.t0_ns // 1000 - 1_000_000, "end": time.time_ns() // 1000}


def _envelope_ok(body: dict[str, Any]) -> list[Any]:
    assert set(body) == {"data", "total", "limit", "offset", "errors"}
    assert body["errors"] is None and body["limit"] == 0 and body["offset"] == 0
    assert isinstance(body["data"], list) and isinstance(body["total"], int)
    return body["data"]


def _same_shape(actual: Any, reference: Any, where: str) -> None:
    """Key sets and JSON value types of ``actual`` match ``reference``, recursively (list
    elements against the reference's first element)."""
    if isinstance(reference, dict):
        assert isinstance(actual, dict), where
        assert set(actual) == set(reference), f"{where}: {set(actual) ^ set(reference)}"
        for key in reference:
            _same_shape(actual[key], reference[key], f"{where}.{key}")
    elif isinstance(reference, list):
        assert isinstance(actual, list), where
        if reference:
            for i, item in enumerate(actual):
                _same_shape(item, reference[0], f"{where}[{i}]")
    elif reference is None:
        assert actual is None, where
    elif isinstance(reference, bool):
        assert isinstance(actual, bool), where
    elif isinstance(reference, int):
        assert isinstance(actual, int) and not isinstance(actual, bool), where
    else:
        assert isinstance(actual, type(reference)), where


def _tags(tags: list[dict[str, Any]]) -> dict[str, tuple[str, Any]]:
    return {t["key"]: (t["type"], t["value"]) for t in tags}


# -- v1 ---------------------------------------------------------------------------------


def test_v1_services_and_operations(collector: Running) -> None:
    services = _envelope_ok(_get(collector, "/api/services").json())
    assert {"jt-front", "jt-back"} <= set(services)
    names = _envelope_ok(_get(collector, "/api/services/jt-front/operations").json())
    assert names == ["GET /chat", "GET /health", "call back"]
    ops = _envelope_ok(_get(collector, "/api/operations", service="jt-front").json())
    assert {(o["name"], o["spanKind"]) for o in ops} == {
        ("GET /chat", "server"),
        ("GET /health", "server"),
        ("call back", "client"),
    }
    clients = _get(collector, "/api/operations", service="jt-front", spanKind="client").json()
    assert _envelope_ok(clients) == [{"name": "call back", "spanKind": "client"}]


def test_v1_trace_has_the_reference_shape(collector: Running) -> None:
    sent = collector.sent
    data = _envelope_ok(_get(collector, f"/api/traces/{sent.main_trace}").json())
    assert len(data) == 1
    trace = data[0]
    reference = json.loads((REFERENCE / "v1_trace.json").read_text())
    assert set(trace) == set(reference)
    assert trace["traceID"] == sent.main_trace and trace["warnings"] is None
    by_name = {s["operationName"]: s for s in trace["spans"]}
    for span in trace["spans"]:
        _same_shape(
            {k: v for k, v in span.items() if k not in ("tags", "logs")},
            {k: v for k, v in reference["spans"][0].items() if k not in ("tags", "logs")},
            "span",
        )
        for ref in span["references"]:
            _same_shape(ref, reference["spans"][1]["references"][0], "reference")
        for tag in span["tags"]:
            assert set(tag) == {"key", "type", "value"}
        for log in span["logs"]:
            ref_log = reference["spans"][0]["logs"][0]
            _same_shape({**log, "fields": []}, {**ref_log, "fields": []}, "log")
            for f in log["fields"]:
                assert set(f) == {"key", "type", "value"}
        assert span["traceID"] == sent.main_trace
        assert len(span["spanID"]) == 16 and span["spanID"] == span["spanID"].lower()
        trace_id, name, parent, _ = sent.spans[span["spanID"]]
        assert span["operationName"] == name
        expected_refs = (
            [{"refType": "CHILD_OF", "traceID": trace_id, "spanID": parent}] if parent else []
        )
        assert span["references"] == expected_refs

    root, gen = by_name["GET /chat"], by_name["generate"]
    assert root["startTime"] == sent.t0_ns // 1000 and root["duration"] == 50_000
    assert gen["startTime"] == (sent.t0_ns + 3 * MS) // 1000 and gen["duration"] == 37_000
    tags = _tags(root["tags"])
    assert tags["http.route"] == ("string", "/chat")
    assert tags["req.tokens"] == ("int64", 42)
    assert tags["req.big"] == ("int64", str(BIG))
    assert tags["req.temperature"] == ("float64", 0.25)
    assert tags["req.stream"] == ("bool", True)
    assert tags["span.kind"] == ("string", "server")
    gen_tags = _tags(gen["tags"])
    assert gen_tags["gen.ok"] == ("bool", False) and gen_tags["gen.tokens"] == ("int64", 5)
    assert gen_tags["error"] == ("bool", True)
    assert gen_tags["otel.status_code"] == ("string", "ERROR")
    assert gen_tags["otel.status_description"] == ("string", "out of blocks")
    assert gen["logs"] == [
        {
            "timestamp": (sent.t0_ns + 10 * MS) // 1000,
            "fields": [
                {"key": "event", "type": "string", "value": "first token"},
                {"key": "token.index", "type": "int64", "value": 0},
                {"key": "token.text", "type": "string", "value": "hi"},
            ],
        }
    ]

    assert set(trace["processes"]) == {"p1", "p2"}
    for pid, process in trace["processes"].items():
        _same_shape(
            {"serviceName": process["serviceName"], "tags": []}, reference["processes"]["p1"], pid
        )
    front = trace["processes"][root["processID"]]
    back = trace["processes"][gen["processID"]]
    assert front["serviceName"] == "jt-front" and back["serviceName"] == "jt-back"
    assert by_name["call back"]["processID"] == root["processID"] != gen["processID"]
    front_tags = _tags(front["tags"])
    assert front_tags["node.rank"] == ("int64", 3) and front_tags["host.name"] == (
        "string",
        "box-1",
    )
    assert "service.name" not in front_tags


def _search(running: Running, **params: Any) -> set[str]:
    response = _get(running, "/api/traces", **(_window(running) | params))
    assert response.status_code == 200, response.text
    data = _envelope_ok(response.json())
    for trace in data:
        assert {s["traceID"] for s in trace["spans"]} == {trace["traceID"]}
    return {t["traceID"] for t in data}


def test_v1_search_filters(collector: Running) -> None:
    main, quick = collector.sent.main_trace, collector.sent.quick_trace
    assert _search(collector, service="jt-front") == {main, quick}
    assert _search(collector, service="jt-back") == {main}
    assert _search(collector, service="jt-front", operation="GET /health") == {quick}
    assert _search(collector, service="jt-front", minDuration="20ms") == {main}
    assert _search(collector, service="jt-front", maxDuration="1.5ms") == {quick}
    assert _search(collector, service="jt-front", tags='{"req.tokens": "42"}') == {main}
    assert _search(collector, service="jt-front", tags='{"host.name": "box-1"}') == {main, quick}
    assert _search(collector, service="jt-back", tags='{"error": "true"}') == {main}
    assert _search(collector, service="jt-front", tags='{"error": "true"}') == set()
    assert _search(collector, service="jt-front", tags='{"http.route": "/nope"}') == set()
    assert len(_search(collector, service="jt-front", limit=1)) == 1
    # A found trace is whole: spans of every service, not just the matching one.
    found = _envelope_ok(
        _get(collector, "/api/traces", service="jt-back", **_window(collector)).json()
    )
    assert len(found[0]["spans"]) == 3


def _v1_error(response: httpx.Response, code: int) -> str:
    assert response.status_code == code, response.text
    body = response.json()
    assert set(body) == {"data", "total", "limit", "offset", "errors"}
    assert body["data"] is None and body["total"] == 0
    assert len(body["errors"]) == 1 and body["errors"][0]["code"] == code
    return str(body["errors"][0]["msg"])


def test_v1_errors(collector: Running) -> None:
    assert _v1_error(_get(collector, "/api/traces/" + "ab" * 16), 404) == "trace not found"
    assert "traceID" in _v1_error(_get(collector, "/api/traces/not-hex"), 400)
    assert "traceID" in _v1_error(_get(collector, "/api/traces/'%20OR%201=1"), 400)
    assert "minDuration" in _v1_error(
        _get(collector, "/api/traces", service="jt-front", minDuration="ten"), 400
    )
    assert "tags" in _v1_error(_get(collector, "/api/traces", service="jt-front", tags="{"), 400)
    assert "limit" in _v1_error(_get(collector, "/api/traces", service="x", limit="many"), 400)
    assert "service" in _v1_error(_get(collector, "/api/traces"), 400)
    assert "lookback" in _v1_error(_get(collector, "/api/dependencies", lookback="x"), 400)


def test_v1_dependencies(collector: Running) -> None:
    deps = _envelope_ok(
        _get(collector, "/api/dependencies", endTs=time.time_ns() // MS, lookback=3_600_000).json()
    )
    assert deps == [{"parent": "jt-front", "child": "jt-back", "callCount": 1}]


# -- v3 ---------------------------------------------------------------------------------


def _parse_otlp(result: dict[str, Any]) -> TracesData:
    """OTLP-JSON (hex ids) → TracesData; protobuf's JSON mapping wants base64 bytes."""

    def b64(hex_id: str) -> str:
        return base64.b64encode(bytes.fromhex(hex_id)).decode()

    for rs in result["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = b64(span[key])
                for link in span.get("links", []):
                    link["traceId"], link["spanId"] = b64(link["traceId"]), b64(link["spanId"])
    return json_format.ParseDict(result, TracesData(), ignore_unknown_fields=False)


def _value(v: AnyValue) -> Any:
    return getattr(v, v.WhichOneof("value") or "string_value")


def _spans_of(data: TracesData) -> dict[str, tuple[str, str, str, dict[str, Any]]]:
    out = {}
    for rs in data.resource_spans:
        for ss in rs.scope_spans:
            for s in ss.spans:
                out[s.span_id.hex()] = (
                    s.trace_id.hex(),
                    s.name,
                    s.parent_span_id.hex(),
                    {kv.key: _value(kv.value) for kv in s.attributes},
                )
    return out


def test_v3_services_and_operations(collector: Running) -> None:
    reference = json.loads((REFERENCE / "v3_get_services.json").read_text())
    services = _get(collector, "/api/v3/services").json()
    _same_shape(services, reference, "services")
    assert {"jt-front", "jt-back"} <= set(services["services"])
    ops = _get(collector, "/api/v3/operations", service="jt-back").json()
    _same_shape(ops, json.loads((REFERENCE / "v3_get_operations.json").read_text()), "ops")
    assert ops == {"operations": [{"name": "generate", "spanKind": "server"}]}
    clients = _get(collector, "/api/v3/operations", service="jt-front", span_kind="client")
    assert clients.json() == {"operations": [{"name": "call back", "spanKind": "client"}]}


def test_v3_get_trace_is_otlp(collector: Running) -> None:
    sent = collector.sent
    response = _get(collector, f"/api/v3/traces/{sent.main_trace}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"result"}
    data = _parse_otlp(body["result"])
    expected = {k: v for k, v in sent.spans.items() if v[0] == sent.main_trace}
    assert _spans_of(data) == expected
    services = {
        kv.value.string_value
        for rs in data.resource_spans
        for kv in rs.resource.attributes
        if kv.key == "service.name"
    }
    assert services == {"jt-front", "jt-back"}
    gen = next(s for s in _all_spans(data) if s.name == "generate")
    assert gen.kind == 2 and gen.status.code == 2 and gen.status.message == "out of blocks"
    assert gen.start_time_unix_nano == sent.t0_ns + 3 * MS
    assert gen.end_time_unix_nano == sent.t0_ns + 40 * MS
    assert [(e.name, e.time_unix_nano) for e in gen.events] == [
        ("first token", sent.t0_ns + 10 * MS)
    ]

    missing = _get(collector, "/api/v3/traces/" + "cd" * 16)
    assert missing.status_code == 404 and missing.json()["error"]["httpCode"] == 404
    assert _get(collector, "/api/v3/traces/xyz").status_code == 400


def _all_spans(data: TracesData) -> list[Any]:
    return [s for rs in data.resource_spans for ss in rs.scope_spans for s in ss.spans]


def _rfc3339(ns: int) -> str:
    from tokentrace.collector.store import NsDatetime

    return NsDatetime.from_ns(ns).isoformat()


def test_v3_find_traces_and_summaries(collector: Running) -> None:
    sent = collector.sent
    window = {
        "query.start_time_min": _rfc3339(sent.t0_ns - 1_000 * MS),
        "query.start_time_max": _rfc3339(time.time_ns()),
    }
    response = _get(collector, "/api/v3/traces", **window, **{"query.service_name": "jt-front"})
    assert response.status_code == 200, response.text
    assert _spans_of(_parse_otlp(response.json()["result"])) == sent.spans

    camel = {
        "query.startTimeMin": window["query.start_time_min"],
        "query.startTimeMax": window["query.start_time_max"],
        "query.serviceName": "jt-front",
        "query.durationMin": "20ms",
        "query.attributes": '{"req.stream": "true"}',
    }
    response = _get(collector, "/api/v3/traces", **camel)
    assert response.status_code == 200, response.text
    found = _spans_of(_parse_otlp(response.json()["result"]))
    assert {v[0] for v in found.values()} == {sent.main_trace}
    one = _get(collector, "/api/v3/traces", **window, **{"query.search_depth": 1})
    assert len({v[0] for v in _spans_of(_parse_otlp(one.json()["result"])).values()}) == 1

    missing = _get(collector, "/api/v3/traces", **{"query.service_name": "jt-front"})
    assert missing.status_code == 400 and "start_time_min" in missing.json()["error"]["message"]
    bad = _get(collector, "/api/v3/traces", **window, **{"query.duration_min": "soon"})
    assert bad.status_code == 400 and "duration_min" in bad.json()["error"]["message"]

    summaries = _get(
        collector, "/api/v3/trace-summaries", **window, **{"query.service_name": "jt-back"}
    ).json()
    reference = json.loads((REFERENCE / "v3_find_trace_summaries.json").read_text())
    _same_shape(summaries, reference, "summaries")
    assert summaries["summaries"] == [
        {
            "traceId": sent.main_trace,
            "rootServiceName": "jt-front",
            "rootOperationName": "GET /chat",
            "minStartTimeUnixNano": str(sent.t0_ns),
            "maxEndTimeUnixNano": str(sent.t0_ns + 50 * MS),
            "spanCount": 3,
            "errorSpanCount": 1,
            "services": [
                {"name": "jt-back", "spanCount": 1, "errorSpanCount": 1},
                {"name": "jt-front", "spanCount": 2, "errorSpanCount": 0},
            ],
        }
    ]


@pytest.mark.parametrize(
    ("path", "params", "status", "says"),
    [
        ("/api/traces/xyz", {}, 400, "malformed parameter traceID"),
        ("/api/traces", {"traceID": "not-hex"}, 400, "malformed parameter traceID"),
        ("/api/traces/" + "ef" * 16, {}, 404, "trace not found"),
        ("/api/operations", {}, 400, "parameter 'service' is required"),
        ("/api/dependencies", {"lookback": "-1"}, 400, "lookback"),
        ("/api/dependencies", {"endTs": "soon"}, 400, "endTs"),
    ],
)
def test_v1_errors_answer_in_the_v1_shape(
    collector: Running, path: str, params: dict[str, str], status: int, says: str
) -> None:
    """Jaeger's UI reads v1 errors from ``errors[0].msg``, with the HTTP status in both
    the response and ``errors[0].code``."""
    resp = _get(collector, path, **params)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["data"] is None and body["errors"][0]["code"] == status
    assert says in body["errors"][0]["msg"]
