"""``tokentrace collector --forward-otlp``: a real collector process forwarding to real
OTLP servers on loopback ports chosen at run time.

The targets are an OTLP/gRPC server built from opentelemetry-proto's service definition
and an OTLP/HTTP server on ``http.server``; each records every span it receives. Spans
go in through the OpenTelemetry SDK's OTLP/gRPC exporter (and OTLP/HTTP JSON for a
partially rejected export).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from collector_process import start_collector as launch_collector
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tokentrace.instrument.recorder import TokenRecorder
from tokentrace.schemas import attributes as A

pytestmark = pytest.mark.timeout(60)

T0_NS = 1_700_000_000_000_000_000
MS = 1_000_000

# (trace id hex, span id hex, name, attributes as strings)
SpanKey = tuple[str, str, str, tuple[tuple[str, str], ...]]


def _keys(request: ExportTraceServiceRequest) -> list[SpanKey]:
    out: list[SpanKey] = []
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                attrs = tuple(
                    sorted(
                        (kv.key, str(getattr(kv.value, kv.value.WhichOneof("value") or "")))
                        for kv in span.attributes
                    )
                )
                out.append((span.trace_id.hex(), span.span_id.hex(), span.name, attrs))
    return out


class _Recorder:
    """Every span the target received, in arrival order; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.spans: list[SpanKey] = []
        self.exports = 0

    def record(self, request: ExportTraceServiceRequest) -> None:
        with self._lock:
            self.spans.extend(_keys(request))
            self.exports += 1

    def snapshot(self) -> list[SpanKey]:
        with self._lock:
            return list(self.spans)

    def wait_for(self, count: int, timeout_s: float) -> list[SpanKey]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.spans) >= count:
                    return list(self.spans)
            time.sleep(0.05)
        with self._lock:
            return list(self.spans)


class _RecordingTraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, recorder: _Recorder) -> None:
        self._recorder = recorder

    def Export(self, request: Any, context: Any) -> ExportTraceServiceResponse:  # noqa: N802
        self._recorder.record(request)
        return ExportTraceServiceResponse()


def _grpc_target(port: int = 0) -> tuple[grpc.Server, int, _Recorder]:
    recorder = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
        _RecordingTraceService(recorder), server
    )
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound != 0, f"cannot bind the recording OTLP/gRPC server to port {port}"
    server.start()
    return server, bound, recorder


def _http_target() -> tuple[ThreadingHTTPServer, int, _Recorder]:
    recorder = _Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["content-length"]))
            ok = (
                self.path == "/v1/traces"
                and self.headers["content-type"] == "application/x-protobuf"
            )
            if ok:
                recorder.record(ExportTraceServiceRequest.FromString(body))
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200 if ok else 400)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1]), recorder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the collector process --------------------------------------------------------------


@dataclass
class Running:
    proc: subprocess.Popen[str]
    data_dir: Path
    info: dict[str, Any]
    stderr_path: Path

    @property
    def api(self) -> str:
        return f"http://{self.info['http']}"

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.api}/health", timeout=10).json())

    def query(self, sql: str) -> list[dict[str, Any]]:
        body = httpx.post(f"{self.api}/query", json={"sql": sql}, timeout=30).json()
        return [dict(zip(body["columns"], row, strict=True)) for row in body["rows"]]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def start_collector(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(*extra: str, data_dir: Path | None = None) -> Running:
        """A collector; ``data_dir`` of an earlier one to restart it on its log."""
        data_dir = data_dir or tmp_path / f"collector-{len(started)}"
        stderr_path = tmp_path / f"collector-{len(started)}.stderr"
        proc, info, _ = launch_collector(data_dir, *extra, stderr=stderr_path.open("w"))
        running = Running(proc, data_dir, info, stderr_path)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait(timeout=10)


def _send_spans(collector: Running, count: int, tag: str) -> tuple[list[SpanKey], list[float]]:
    """``count`` spans, one OTLP/gRPC export each (the SDK's exporter); returns what was
    sent and how long each export took to be acknowledged."""
    exporter = OTLPSpanExporter(endpoint=collector.info["otlp_grpc"], insecure=True)
    tp = TracerProvider(resource=Resource.create({A.SERVICE_NAME: "tt-forward-test"}))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = tp.get_tracer("forward-test")
    sent: list[SpanKey] = []
    ack_s: list[float] = []
    for k in range(count):
        attrs: dict[str, int | str] = {A.TOKEN_INDEX: k, "test.tag": tag}
        span = tracer.start_span(f"{tag}.{k}", start_time=T0_NS + k * MS, attributes=attrs)
        ctx = span.get_span_context()
        began = time.monotonic()
        span.end(end_time=T0_NS + (k + 1) * MS)  # SimpleSpanProcessor: exports here
        ack_s.append(time.monotonic() - began)
        sent.append(
            (
                format(ctx.trace_id, "032x"),
                format(ctx.span_id, "016x"),
                f"{tag}.{k}",
                tuple(sorted((key, str(v)) for key, v in attrs.items())),
            )
        )
    tp.shutdown()
    return sent, ack_s


def _stored(collector: Running, tag: str) -> list[SpanKey]:
    rows = collector.query(
        "SELECT TraceId, SpanId, SpanName, SpanAttributes FROM otel_traces "
        f"WHERE SpanAttributes['test.tag'] = '{tag}' ORDER BY Timestamp"
    )
    return [
        (r["TraceId"], r["SpanId"], r["SpanName"], tuple(sorted(r["SpanAttributes"].items())))
        for r in rows
    ]


def _wait_health(
    collector: Running, target: str, ok: Callable[[dict[str, int]], bool], timeout_s: float
) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        counters: dict[str, int] = collector.health()["forwarded"][target]
        if ok(counters) or time.monotonic() > deadline:
            return counters
        time.sleep(0.05)


# -- tests -------------------------------------------------------------------------------


def test_forwards_exactly_the_accepted_spans_over_grpc_and_http(
    start_collector: Callable[..., Running],
) -> None:
    grpc_server, grpc_port, grpc_rec = _grpc_target()
    http_server, http_port, http_rec = _http_target()
    grpc_url, http_url = f"grpc://127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    try:
        collector = start_collector("--forward-otlp", grpc_url, "--forward-otlp", http_url)
        assert collector.info["forward"] == [grpc_url, http_url]
        sent, _ = _send_spans(collector, 5, "live")

        # One OTLP/HTTP JSON export with a span the collector rejects: only the good
        # span is stored, and only the good span is forwarded.
        trace_hex, good_id = "7bf92f3577b34da6a3ce929d0e0e4739", "30f067aa0ba902b7"
        doc = {
            "resourceSpans": [
                {
                    "scopeSpans": [
                        {
                            "spans": [
                                {
                                    "traceId": trace_hex,
                                    "spanId": good_id,
                                    "name": "partial.good",
                                    "startTimeUnixNano": str(T0_NS),
                                    "endTimeUnixNano": str(T0_NS + MS),
                                    "attributes": [
                                        {"key": "test.tag", "value": {"stringValue": "live"}}
                                    ],
                                },
                                {
                                    "traceId": trace_hex,
                                    "spanId": "30f067aa0ba902b8",
                                    "name": "partial.bad",
                                    "startTimeUnixNano": str(T0_NS + MS),
                                    "endTimeUnixNano": str(T0_NS),
                                },
                            ]
                        }
                    ]
                }
            ]
        }
        response = httpx.post(
            f"http://{collector.info['otlp_http']}/v1/traces", json=doc, timeout=30
        )
        assert response.status_code == 200
        assert int(response.json()["partialSuccess"]["rejectedSpans"]) == 1
        expected = [*sent, (trace_hex, good_id, "partial.good", (("test.tag", "live"),))]

        for recorder in (grpc_rec, http_rec):
            received = recorder.wait_for(len(expected), timeout_s=10)
            time.sleep(0.2)  # nothing more may arrive
            assert sorted(recorder.spans) == sorted(expected) == sorted(received)
        assert sorted(_stored(collector, "live")) == sorted(expected)
        forwarded = collector.health()["forwarded"]
        for url in (grpc_url, http_url):
            assert forwarded[url] == {
                "sent_spans": 6,
                "dropped_spans": 0,
                "retries": 0,
                "pending_records": 0,
            }
        assert collector.stop() == 0
    finally:
        grpc_server.stop(0)
        http_server.shutdown()
        http_server.server_close()


def test_packed_token_spans_are_forwarded_expanded(
    start_collector: Callable[..., Running],
) -> None:
    """A decode span sent in packed mode reaches the target as what was stored: the
    decode span without its packed attribute, then one llm.token span per emission."""
    server, port, recorder = _grpc_target()
    target = f"grpc://127.0.0.1:{port}"
    try:
        collector = start_collector("--forward-otlp", target)
        exporter = OTLPSpanExporter(endpoint=collector.info["otlp_grpc"], insecure=True)
        tp = TracerProvider(resource=Resource.create({A.SERVICE_NAME: "tt-packed-test"}))
        tp.add_span_processor(SimpleSpanProcessor(exporter))
        rec = TokenRecorder(4)
        rec.start()
        for step in range(5):  # one emission more than the capacity: the arrays grow
            rec.record(2 if step == 3 else 1, step, 3)
        span = tp.get_tracer("t").start_span(A.SPAN_DECODE, attributes={"test.tag": "packed"})
        assert rec.pack_into(span) == 5
        span.end()
        tp.shutdown()

        received = recorder.wait_for(6, timeout_s=10)
        time.sleep(0.2)
        assert len(recorder.spans) == 6
        stored = collector.query(
            "SELECT TraceId, SpanId, SpanName, SpanAttributes FROM otel_traces "
            "WHERE ServiceName = 'tt-packed-test'"
        )
        stored_keys = [
            (r["TraceId"], r["SpanId"], r["SpanName"], tuple(sorted(r["SpanAttributes"].items())))
            for r in stored
        ]
        assert sorted(received) == sorted(stored_keys)
        names = sorted(k[2] for k in received)
        assert names == [A.SPAN_DECODE] + [A.SPAN_TOKEN] * 5
        assert all(A.TOKEN_PACKED not in dict(k[3]) for k in received)
        indices = sorted(int(dict(k[3])[A.TOKEN_INDEX]) for k in received if k[2] == A.SPAN_TOKEN)
        assert indices == [0, 1, 2, 3, 5]  # emission 3 carried two tokens
        assert collector.health()["forwarded"][target]["sent_spans"] == 6
        assert collector.stop() == 0
    finally:
        server.stop(0)


def _exactly(recorder: _Recorder, expected: list[SpanKey], timeout_s: float) -> list[SpanKey]:
    """What the target received once it has as many spans as expected, and a moment
    later: nothing more may arrive (a span sent twice would)."""
    recorder.wait_for(len(expected), timeout_s=timeout_s)
    time.sleep(0.3)
    return recorder.snapshot()


def test_dead_target_never_blocks_storage_and_catches_up_when_it_comes_back(
    start_collector: Callable[..., Running],
) -> None:
    port = _free_port()
    target = f"grpc://127.0.0.1:{port}"
    collector = start_collector("--forward-otlp", target, "--forward-max-backoff", "1")
    sent, ack_s = _send_spans(collector, 6, "dead")
    # Storage acks in group-commit time; a blocking forwarder would wait out the RPC.
    assert max(ack_s) < 1.0, ack_s
    assert sorted(_stored(collector, "dead")) == sorted(sent)
    down = _wait_health(collector, target, lambda c: c["retries"] >= 2, timeout_s=10)
    assert down["retries"] >= 2 and down["pending_records"] >= 1, down
    assert down["sent_spans"] == 0 and down["dropped_spans"] == 0, down
    health = collector.health()
    assert health["store_ok"] and health["wal_pending_bytes"] > 0  # held for the target
    assert "retrying with backoff" in collector.stderr_path.read_text()

    server, bound, recorder = _grpc_target(port)
    try:
        assert bound == port
        assert sorted(_exactly(recorder, sent, timeout_s=15)) == sorted(sent)
        up = _wait_health(collector, target, lambda c: c["pending_records"] == 0, timeout_s=5)
        assert up == {
            "sent_spans": 6,
            "dropped_spans": 0,
            "retries": up["retries"],
            "pending_records": 0,
        }
        assert collector.health()["wal_pending_bytes"] == 0
        assert collector.stop() == 0
    finally:
        server.stop(0)
    assert "target reachable again" in collector.stderr_path.read_text()


def test_a_backlog_for_a_dead_target_outlives_a_restart_and_arrives_once(
    start_collector: Callable[..., Running],
) -> None:
    port = _free_port()
    target = f"grpc://127.0.0.1:{port}"
    args = ("--forward-otlp", target, "--forward-max-backoff", "0.5")
    first = start_collector(*args, "--forward-shutdown-timeout", "0")
    sent, _ = _send_spans(first, 5, "restart")
    _wait_health(first, target, lambda c: c["retries"] >= 1, timeout_s=10)
    assert first.stop() == 0
    log = first.stderr_path.read_text()
    assert "records not sent within the 0.0 s shutdown timeout" in log, log

    server, bound, recorder = _grpc_target(port)
    try:
        assert bound == port
        second = start_collector(*args, data_dir=first.data_dir)
        assert sorted(_exactly(recorder, sent, timeout_s=15)) == sorted(sent)
        more, _ = _send_spans(second, 2, "restart")  # and what arrives now, after them
        assert sorted(_exactly(recorder, sent + more, timeout_s=15)) == sorted(sent + more)
        assert sorted(_stored(second, "restart")) == sorted(sent + more)  # once each
        assert second.stop() == 0
    finally:
        server.stop(0)


def test_an_unreachable_clickhouse_does_not_stop_forwarding(
    start_collector: Callable[..., Running],
) -> None:
    closed = _free_port()  # nothing listens: every insert fails with a transient error
    server, port, recorder = _grpc_target()
    target = f"grpc://127.0.0.1:{port}"
    try:
        collector = start_collector(
            "--clickhouse", f"http://127.0.0.1:{closed}", "--forward-otlp", target
        )
        sent, ack_s = _send_spans(collector, 6, "no-clickhouse")
        assert max(ack_s) < 5.0, ack_s  # acknowledged once durable in the log
        assert sorted(_exactly(recorder, sent, timeout_s=15)) == sorted(sent)
        deadline = time.monotonic() + 30  # the first insert is tried with its block
        while (health := collector.health())["store_ok"]:
            assert time.monotonic() < deadline, health
            time.sleep(0.05)
        assert health["spans_stored"] == 0 and health["store_errors"] >= 1, health
        assert health["forwarded"][target]["pending_records"] == 0
        assert health["wal_pending_records"] >= 1  # kept for ClickHouse
        assert collector.stop() == 0
    finally:
        server.stop(0)


def test_http_target_retry_after_is_honoured_and_400_is_never_retried(tmp_path: Path) -> None:
    """The forward stage in-process against real HTTP servers: 503 + Retry-After is
    retried after the given delay; 400 drops the batch at once."""
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

    from tokentrace.collector.ingest.forward import ForwardConfig, OtlpForwarder, forward_reader
    from tokentrace.collector.ingest.logrecord import encode_record, export_digest
    from tokentrace.collector.ingest.wal import STORE_READER, LogReader, WalConfig, WriteAheadLog

    arrivals: list[tuple[float, int]] = []  # (monotonic time, status answered)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["content-length"]))
            if self.path == "/bad":
                status = 400
            else:
                status = 503 if not any(s == 503 for _, s in arrivals) else 200
            arrivals.append((time.monotonic(), status))
            self.send_response(status)
            if status == 503:
                self.send_header("retry-after", "1")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = int(server.server_address[1])
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                scope_spans=[
                    ScopeSpans(
                        spans=[
                            Span(
                                trace_id=bytes(range(1, 17)),
                                span_id=bytes(range(1, 9)),
                                name="x",
                                start_time_unix_nano=T0_NS,
                                end_time_unix_nano=T0_NS + MS,
                            )
                        ]
                    )
                ]
            )
        ]
    )
    urls = (f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/bad")
    log = WriteAheadLog(
        WalConfig(str(tmp_path / "wal")),
        readers=(LogReader(STORE_READER), *(forward_reader(u) for u in urls)),
    )
    retried, refused = (
        OtlpForwarder(ForwardConfig(url, initial_backoff_s=0.05), log) for url in urls
    )
    wire = request.SerializeToString()
    log.append(encode_record(T0_NS, [(export_digest(wire), wire)]))
    try:
        for forwarder in (retried, refused):
            forwarder.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
            retried.counters()["sent_spans"] < 1 or refused.counters()["dropped_spans"] < 1
        ):
            time.sleep(0.02)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and log.pending_bytes:
            time.sleep(0.02)
        assert retried.counters() == {
            "sent_spans": 1,
            "dropped_spans": 0,
            "retries": 1,
            "pending_records": 0,
        }
        assert refused.counters() == {
            "sent_spans": 0,
            "dropped_spans": 1,
            "retries": 0,
            "pending_records": 0,
        }
        good = [(t, s) for t, s in arrivals if s != 400]
        assert [s for _, s in good] == [503, 200]
        assert good[1][0] - good[0][0] >= 0.9  # Retry-After: 1, not the 0.05 s backoff
        assert [s for _, s in arrivals].count(400) == 1
    finally:
        retried.shutdown(1.0)
        refused.shutdown(1.0)
        log.close()
        server.shutdown()
        server.server_close()
