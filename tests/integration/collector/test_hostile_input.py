"""Hostile and malformed OTLP against a real ``tokentrace collector`` process.

Each case gets a clear refusal: of the whole request (HTTP 400/413, gRPC
``INVALID_ARGUMENT``/``RESOURCE_EXHAUSTED``) or of just its bad spans, through OTLP's
partial success, while the valid spans sent with them are stored. The collector keeps
serving, with flat memory. Tests run in file order: the memory test repeats every case,
the last one checks a fresh export is still stored.
"""

from __future__ import annotations

import gzip
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest
from collector_process import Running, running_collector
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from otlp_payloads import (
    HOUR_NS,
    PROTOBUF,
    Answer,
    export_grpc,
    nest,
    new_trace_id,
    post,
    request,
    rss_bytes,
    span,
    stored_span_ids,
    to_json,
    value,
)

from tokentrace.schemas import attributes as A

pytestmark = pytest.mark.timeout(300)

T0_NS = 1_700_000_000_000_000_000
MIB = 1 << 20
BIG_BYTES = 100 * MIB  # past the receivers' 64 MiB limit
JSON = "application/json"


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_collector(tmp_path_factory.mktemp("hostile")) as running:
        yield running


# -- requests refused as a whole ---------------------------------------------------------


def _marked(trace_id: bytes) -> ExportTraceServiceRequest:
    """A valid request whose span name, one attribute key and one value are ``MARK``,
    ready to be corrupted in its bytes."""
    return request(({}, [span(trace_id, 1, T0_NS, T0_NS + 10, "MARK", {"MARK": "MARK"})]))


def _not_utf8_protobuf(trace_id: bytes) -> bytes:
    return _marked(trace_id).SerializeToString().replace(b"MARK", b"M\xff\xfeK")


def _not_utf8_json(trace_id: bytes) -> bytes:
    return to_json(_marked(trace_id)).replace(b'"MARK"', b'"M\xff\xfeK"')


def _lone_surrogate_json(trace_id: bytes) -> bytes:
    return to_json(_marked(trace_id)).replace(b'"MARK"', b'"M\\ud800K"')


def _deeper_than_the_parser_protobuf(trace_id: bytes) -> bytes:
    req = request(({}, [span(trace_id, 1, T0_NS, T0_NS + 10)]))
    nest(req.resource_spans[0].scope_spans[0].spans[0].attributes.add(key="d").value, 40, "kvlist")
    return req.SerializeToString()


def _deeper_than_python_json(trace_id: bytes) -> bytes:
    levels = 100_000
    deep = b'{"arrayValue":{"values":[' * levels + b"{}" + b"]}}" * levels
    doc = to_json(request(({}, [span(trace_id, 1, T0_NS, T0_NS + 10, attrs={"d": 0})])))
    return doc.replace(b'{"intValue": "0"}', deep)


# name -> (content type, body for a trace id, what the refusal must say)
WHOLE_REQUEST_CASES: dict[str, tuple[str, Callable[[bytes], bytes], str]] = {
    "garbage protobuf": (PROTOBUF, lambda t: b"\xff\xfe\x00" * 100, "invalid OTLP protobuf"),
    "truncated protobuf": (
        PROTOBUF,
        lambda t: _marked(t).SerializeToString()[:-7],
        "invalid OTLP protobuf",
    ),
    "invalid JSON": (JSON, lambda t: to_json(_marked(t))[:-3], "invalid JSON"),
    "not UTF-8 in protobuf": (PROTOBUF, _not_utf8_protobuf, "bytes that are not UTF-8"),
    "not UTF-8 in JSON": (JSON, _not_utf8_json, "can't decode byte 0xff"),
    "lone surrogate in JSON": (JSON, _lone_surrogate_json, "Unpaired surrogate"),
    "nested past the parser (protobuf)": (
        PROTOBUF,
        _deeper_than_the_parser_protobuf,
        "nested more than 100 levels deep",
    ),
    "nested 100,000 deep (JSON)": (JSON, _deeper_than_python_json, "nested too deeply"),
}


def _whole_request_case(collector: Running, name: str) -> None:
    content_type, make, says = WHOLE_REQUEST_CASES[name]
    trace_id = new_trace_id()
    body = make(trace_id)
    answer = post(collector.otlp_http, body, content_type)
    assert (answer.status, answer.rejected_spans) == (400, 0), (name, answer)
    assert says in answer.message, (name, answer.message)
    if content_type == PROTOBUF:
        answer = export_grpc(collector.otlp_grpc, body)
        assert answer.grpc_code == grpc.StatusCode.INVALID_ARGUMENT, (name, answer)
        assert says in answer.message, (name, answer.message)
    assert stored_span_ids(collector.api, [trace_id]) == set()


@pytest.mark.parametrize("name", list(WHOLE_REQUEST_CASES))
def test_unparsable_requests_are_refused_whole_by_name(collector: Running, name: str) -> None:
    _whole_request_case(collector, name)


# -- spans refused on their own ----------------------------------------------------------


def _set(**fields: Any) -> Callable[[Span], None]:
    def apply(s: Span) -> None:
        for key, v in fields.items():
            setattr(s, key, v)

    return apply


def _add_events(count: int, time_ns: int) -> Callable[[Span], None]:
    def apply(s: Span) -> None:
        for _ in range(count):
            s.events.add(name="e", time_unix_nano=time_ns)

    return apply


def _add_attrs(**attrs: Any) -> Callable[[Span], None]:
    def apply(s: Span) -> None:
        for key, v in attrs.items():
            s.attributes.add(key=key).value.CopyFrom(value(v))

    return apply


def _end_25_h_ahead(s: Span) -> None:
    s.end_time_unix_nano = time.time_ns() + 25 * HOUR_NS


def _nested_20(s: Span) -> None:
    nest(s.attributes.add(key="deep").value, 20, "kvlist")


def _garbage_packed(s: Span) -> None:
    s.name = A.SPAN_DECODE
    s.attributes.add(key=A.TOKEN_PACKED).value.string_value = "1:not base64!"


# name -> (what breaks the span, what its rejection must say)
SPAN_CASES: dict[str, tuple[Callable[[Span], None], str]] = {
    "all-zero trace id": (_set(trace_id=bytes(16)), "trace_id is all zeros"),
    "wrong-length span id": (_set(span_id=b"\x07" * 7), "span_id must be 8 bytes, got 7"),
    "all-zero span id": (_set(span_id=bytes(8)), "span_id is all zeros"),
    "end before start": (_set(end_time_unix_nano=T0_NS - 1), "< start_time_unix_nano"),
    "start in 1970": (
        _set(start_time_unix_nano=1, end_time_unix_nano=2),
        "start_time_unix_nano 1 (1970-01-01T00:00:00Z) is before 2000-01-01T00:00:00Z",
    ),
    "end 25 h ahead": (_end_25_h_ahead, "is more than 24 h after the collector's clock"),
    "end at 2**64 - 1": (
        _set(end_time_unix_nano=2**64 - 1),
        "end_time_unix_nano 18446744073709551615 (2554-07-21T23:34:33Z) is more than 24 h",
    ),
    "event in 2262": (_add_events(1, 2**63), "events[0].time_unix_nano 9223372036854775808"),
    "10,000 events": (_add_events(10_000, T0_NS), "10000 events, more than the limit of 1024"),
    "10,000 attributes": (
        _add_attrs(**{f"a{k}": k for k in range(10_000)}),
        "attributes: 10000 attributes, more than the limit of 1024",
    ),
    "70,000-character value": (
        _add_attrs(prompt="p" * 70_000),
        "attributes['prompt']: value of 70000 characters, more than the limit of 65536",
    ),
    "value nested 20 levels": (
        _nested_20,
        "attributes['deep']: value nested more than 16 levels deep",
    ),
    "garbage packed tokens": (_garbage_packed, "tokentrace.token.packed: packed tokens are not"),
}
TRANSPORTS = ("http-protobuf", "http-json", "grpc")


def _send(collector: Running, transport: str, req: ExportTraceServiceRequest) -> Answer:
    if transport == "grpc":
        return export_grpc(collector.otlp_grpc, req.SerializeToString())
    if transport == "http-json":
        return post(collector.otlp_http, to_json(req), JSON)
    return post(collector.otlp_http, req.SerializeToString())


def _span_case(collector: Running, name: str, transport: str) -> None:
    breaks, says = SPAN_CASES[name]
    trace_id = new_trace_id()
    broken = span(trace_id, 2, T0_NS, T0_NS + 10, "hostile.broken")
    breaks(broken)
    req = request(
        ({"service.name": "hostile"}, [span(trace_id, 1, T0_NS, T0_NS + 10, "hostile.valid")]),
        ({"service.name": "hostile"}, [broken, span(trace_id, 3, T0_NS, T0_NS + 20)]),
    )
    answer = _send(collector, transport, req)
    assert (answer.status, answer.rejected_spans) == (200, 1), (name, transport, answer)
    assert says in answer.message, (name, transport, answer.message)
    assert answer.message.startswith("span resource_spans[1].scope_spans[0].spans[0] name=")
    stored = stored_span_ids(collector.api, [trace_id])
    assert stored == {(trace_id.hex(), "0000000000000001"), (trace_id.hex(), "0000000000000003")}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name", list(SPAN_CASES))
def test_bad_spans_are_rejected_alone_and_their_neighbours_stored(
    collector: Running, name: str, transport: str
) -> None:
    _span_case(collector, name, transport)


def test_a_resource_with_too_many_attributes_rejects_its_spans_only(collector: Running) -> None:
    trace_id = new_trace_id()
    crowded = {f"r{k}": k for k in range(2_000)}
    req = request(
        (crowded, [span(trace_id, 1, T0_NS, T0_NS + 10), span(trace_id, 2, T0_NS, T0_NS + 10)]),
        ({}, [span(trace_id, 3, T0_NS, T0_NS + 10)]),
    )
    for transport in TRANSPORTS:
        answer = _send(collector, transport, req)
        assert (answer.status, answer.rejected_spans) == (200, 2), (transport, answer)
        assert "resource.attributes: 2000 attributes, more than the limit of 1024" in (
            answer.message
        )
    assert stored_span_ids(collector.api, [trace_id]) == {(trace_id.hex(), "0000000000000003")}


# -- oversized requests ------------------------------------------------------------------


def _status_line_for_headers_only(address: str, *extra_headers: str) -> bytes:
    """Send only the headers of a POST declaring a 100 MB body; the status line the
    collector answers with before any of the body is sent."""
    host, port = address.rsplit(":", 1)
    head = "\r\n".join(
        (
            "POST /v1/traces HTTP/1.1",
            f"Host: {address}",
            f"Content-Type: {PROTOBUF}",
            f"Content-Length: {BIG_BYTES}",
            *extra_headers,
            "",
            "",
        )
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.split(b"\r\n", 1)[0]


def _big_chunks() -> Iterator[bytes]:
    chunk = b"\x00" * MIB
    for _ in range(BIG_BYTES // MIB):
        yield chunk


def _oversized_cases(collector: Running) -> None:
    """Every way to send 100 MB: each refused with 413 / RESOURCE_EXHAUSTED."""
    # Refused on its Content-Length, before the body is sent at all...
    for extra in ((), ("Expect: 100-continue",)):
        status = _status_line_for_headers_only(collector.info["otlp_http"], *extra)
        assert status.startswith(b"HTTP/1.1 413"), (extra, status)
    # ... and when it is sent anyway, the client still gets to read the 413.
    answer = post(collector.otlp_http, b"\x00" * BIG_BYTES)
    assert answer.status == 413
    assert (
        answer.message == f"request body of {BIG_BYTES} bytes (Content-Length) exceeds {64 * MIB}"
    )
    # Without a Content-Length (chunked), it is read only up to the limit.
    response = httpx.post(
        collector.otlp_http,
        content=_big_chunks(),
        headers={"content-type": PROTOBUF},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json() == {"code": 8, "message": f"request body exceeds {64 * MIB} bytes"}
    # 100 KB of gzip inflating to 100 MB.
    bomb = gzip.compress(b"\x00" * BIG_BYTES)
    answer = post(collector.otlp_http, bomb, **{"content-encoding": "gzip"})
    assert len(bomb) < MIB and answer.status == 413
    assert answer.message == f"gzip body inflates beyond {64 * MIB} bytes"
    # gRPC refuses it itself, by grpc.max_receive_message_length.
    answer = export_grpc(collector.otlp_grpc, b"\x00" * BIG_BYTES)
    assert answer.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"larger than max ({BIG_BYTES} vs. {64 * MIB})" in answer.message


def test_a_100_mb_request_is_refused_with_413_or_resource_exhausted(collector: Running) -> None:
    _oversized_cases(collector)
    # A body at the limit is read (and here refused for what it is, not for its size).
    answer = post(collector.otlp_http, b"\xff" * (64 * MIB))
    assert answer.status == 400 and "invalid OTLP protobuf" in answer.message


def test_valid_exports_still_go_through(collector: Running) -> None:
    trace_id = new_trace_id()
    body = request(({}, [span(trace_id, 1, T0_NS, T0_NS + 10)])).SerializeToString()
    assert post(collector.otlp_http, body).status == 200
    assert export_grpc(collector.otlp_grpc, body).grpc_code == grpc.StatusCode.OK


# -- the collector afterwards -------------------------------------------------------------


def _hostile_round(collector: Running) -> None:
    for name in WHOLE_REQUEST_CASES:
        _whole_request_case(collector, name)
    for name in SPAN_CASES:
        _span_case(collector, name, "http-protobuf")
    _oversized_cases(collector)
    assert collector.proc.poll() is None


def test_memory_stays_flat_across_rounds_of_hostile_input(collector: Running) -> None:
    """A warm-up round first (allocator arenas, chDB's pages, caches), then three more:
    keeping any of the 100 MB bodies, or of what the bad spans held, would add far more
    than the bound."""
    _hostile_round(collector)
    before = rss_bytes(collector.proc.pid)
    for _ in range(3):
        _hostile_round(collector)
    growth = rss_bytes(collector.proc.pid) - before
    assert growth < 64 * MIB, f"RSS grew by {growth / MIB:.1f} MiB over three rounds"


def test_afterwards_the_collector_is_healthy_and_stores_a_fresh_export(
    collector: Running,
) -> None:
    health = httpx.get(f"{collector.api}/health", timeout=10).json()
    assert health["status"] == "ok" and health["spans_rejected"] > 0
    over_http, over_grpc = new_trace_id(), new_trace_id()
    for trace_id in (over_http, over_grpc):
        body = request(
            ({}, [span(trace_id, 1, T0_NS, T0_NS + 10), span(trace_id, 2, T0_NS, T0_NS + 5)])
        ).SerializeToString()
        if trace_id == over_http:
            assert post(collector.otlp_http, body) == Answer(200, "", 0)
        else:
            assert export_grpc(collector.otlp_grpc, body) == Answer(200, "", 0, grpc.StatusCode.OK)
    assert stored_span_ids(collector.api, [over_http, over_grpc]) == {
        (t.hex(), s)
        for t in (over_http, over_grpc)
        for s in ("0000000000000001", "0000000000000002")
    }
    after = httpx.get(f"{collector.api}/health", timeout=10).json()
    assert after["spans_stored"] == health["spans_stored"] + 4
