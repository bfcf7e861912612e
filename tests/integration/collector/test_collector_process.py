"""A real ``tokentrace collector`` process on loopback ports chosen at run time.

Spans go in over OTLP/gRPC (the OpenTelemetry SDK's exporter) and OTLP/HTTP (protobuf
and JSON); what was stored is read back through ``tokentrace query`` and the /query API.
Tests run in file order: the last one stops the collector and reads the store directly.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from collector_process import Running, running_collector
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from tokentrace.schemas import attributes as A

pytestmark = pytest.mark.timeout(60)

T0_NS = 1_700_000_000_000_000_123
MS = 1_000_000


def _tokentrace(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokentrace", *args]


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_collector(tmp_path_factory.mktemp("collector-data")) as running:
        info, ready = running.info, running.ready
        assert f"otlp-grpc={info['otlp_grpc']}" in ready and f"http={info['http']}" in ready
        assert info["pid"] == running.proc.pid
        yield running


def _api_query(running: Running, sql: str) -> list[dict[str, Any]]:
    body = httpx.post(f"{running.api}/query", json={"sql": sql}, timeout=30).json()
    return [dict(zip(body["columns"], row, strict=True)) for row in body["rows"]]


def _cli_query(data_dir: Path, sql: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        _tokentrace("query", sql, "--data-dir", str(data_dir), "--format", "json"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def _iso(ns: int) -> str:
    from tokentrace.collector.store import NsDatetime

    return NsDatetime.from_ns(ns).isoformat()


# -- OTLP/gRPC with the OpenTelemetry SDK ------------------------------------------------


def test_collector_json_says_which_token_scanner_it_uses(collector: Running) -> None:
    """The collector process loads the same install as these tests: the compiled scanner
    when it was built (tests/unit/collector/ingest/test_tokenspans.py: wherever a
    compiler is)."""
    from tokentrace.collector.ingest import tokenspans

    expected = "compiled" if tokenspans.COMPILED else "python"
    assert collector.info["token_scanner"] == expected


def test_sdk_grpc_export_lands_in_every_table(collector: Running) -> None:
    def provider(node: str, role: str) -> TracerProvider:
        tp = TracerProvider(
            resource=Resource.create({A.SERVICE_NAME: f"tt-{role}", A.NODE_ID: node, A.ROLE: role})
        )
        tp.add_span_processor(
            SimpleSpanProcessor(
                OTLPSpanExporter(endpoint=collector.info["otlp_grpc"], insecure=True)
            )
        )
        return tp

    router, decode = provider("router-1", "router"), provider("decode-1", "decode")
    req = router.get_tracer("t").start_span(
        A.SPAN_REQUEST,
        kind=SpanKind.SERVER,
        start_time=T0_NS,
        attributes={
            A.REQUEST_ID: "grpc-req",
            A.GEN_AI_REQUEST_MODEL: "tiny",
            A.GEN_AI_USAGE_INPUT_TOKENS: 7,
            A.GEN_AI_USAGE_OUTPUT_TOKENS: 4,
            A.GEN_AI_SERVER_TTFT: 0.05,
        },
    )
    trace_id = format(req.get_span_context().trace_id, "032x")
    from opentelemetry.trace import set_span_in_context

    ctx = set_span_in_context(req)
    tracer = decode.get_tracer("t")
    dec = tracer.start_span(
        A.SPAN_DECODE, context=ctx, kind=SpanKind.SERVER, start_time=T0_NS + 10 * MS
    )
    dctx = set_span_in_context(dec)
    kv = tracer.start_span(
        A.SPAN_KV_TRANSFER,
        context=dctx,
        kind=SpanKind.CLIENT,
        start_time=T0_NS + 11 * MS,
        attributes={
            A.KV_BYTES: 4096,
            A.KV_BLOCKS: 2,
            A.KV_BACKEND: "nixl/UCX",
            A.KV_SRC_NODE: "prefill-1",
            A.KV_DST_NODE: "decode-1",
        },
    )
    kv.set_status(Status(StatusCode.ERROR, "peer reset"))
    kv.end(end_time=T0_NS + 13 * MS)
    edges = [T0_NS + 14 * MS, T0_NS + 40 * MS, T0_NS + 52 * MS]
    counts = [1, 2, 1]
    index = 0
    for k, (start, end) in enumerate(zip([T0_NS + 10 * MS, *edges[:-1]], edges, strict=True)):
        tok = tracer.start_span(
            A.SPAN_TOKEN,
            context=dctx,
            start_time=start,
            attributes={A.TOKEN_INDEX: index, A.TOKEN_COUNT: counts[k], A.BATCH_SIZE: 3},
        )
        tok.end(end_time=end)
        index += counts[k]
    dec.end(end_time=edges[-1])
    req.end(end_time=T0_NS + 60 * MS)
    router.shutdown()
    decode.shutdown()

    where = f"TraceId = '{trace_id}'"
    spans = _cli_query(
        collector.data_dir,
        "SELECT SpanName, SpanKind, ServiceName, Timestamp, Duration, "
        f"StatusCode, SpanAttributes FROM otel_traces WHERE {where} "
        "ORDER BY Timestamp, SpanName",
    )
    assert [s["SpanName"] for s in spans] == [
        A.SPAN_REQUEST,
        A.SPAN_DECODE,
        A.SPAN_TOKEN,
        A.SPAN_KV_TRANSFER,
        A.SPAN_TOKEN,
        A.SPAN_TOKEN,
    ]
    assert spans[0]["Timestamp"] == _iso(T0_NS) and spans[0]["Duration"] == 60 * MS
    assert spans[0]["SpanKind"] == "Server" and spans[0]["ServiceName"] == "tt-router"
    assert spans[0]["SpanAttributes"][A.GEN_AI_SERVER_TTFT] == "0.05"
    assert spans[3]["StatusCode"] == "Error"

    requests = _api_query(collector, f"SELECT * FROM requests WHERE trace_id = '{trace_id}'")
    assert len(requests) == 1
    r = requests[0]
    assert (r["request_id"], r["model"], r["router_node"], r["decode_node"]) == (
        "grpc-req",
        "tiny",
        "router-1",
        "decode-1",
    )
    assert (r["input_tokens"], r["output_tokens"], r["status"]) == (7, 4, "ok")
    assert r["ts"] == _iso(T0_NS)
    assert r["e2e_s"] == pytest.approx(0.06) and r["ttft_s"] == pytest.approx(0.05)
    assert r["tpot_s"] == pytest.approx((0.06 - 0.05) / 3)
    assert r["kv_transfer_s"] == pytest.approx(0.002) and r["kv_bytes"] == 4096

    tokens = _cli_query(
        collector.data_dir,
        f"SELECT ts, node, token_index, itl_s, tokens, batch_size "
        f"FROM token_latencies WHERE trace_id = '{trace_id}' ORDER BY ts",
    )
    assert [t["ts"] for t in tokens] == [_iso(e) for e in edges]
    assert [t["token_index"] for t in tokens] == [0, 1, 3]
    assert tokens[0]["itl_s"] is None
    assert [t["itl_s"] for t in tokens[1:]] == [pytest.approx(0.026), pytest.approx(0.012)]
    assert [t["tokens"] for t in tokens] == counts
    assert {t["node"] for t in tokens} == {"decode-1"} and {t["batch_size"] for t in tokens} == {3}

    kvs = _api_query(collector, f"SELECT * FROM kv_transfers WHERE trace_id = '{trace_id}'")
    assert kvs == [
        {
            "ts": _iso(T0_NS + 11 * MS),
            "trace_id": trace_id,
            "src_node": "prefill-1",
            "dst_node": "decode-1",
            "duration_s": pytest.approx(0.002),
            "bytes": 4096,
            "blocks": 2,
            "backend": "nixl/UCX",
            "status": "error",
        }
    ]


# -- OTLP/HTTP ---------------------------------------------------------------------------


def _json_request(trace_hex: str, spans: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [
                        {"key": A.SERVICE_NAME, "value": {"stringValue": "tt-prefill"}},
                        {"key": A.NODE_ID, "value": {"stringValue": "prefill-9"}},
                    ]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "json-test"},
                        "spans": [{"traceId": trace_hex, **s} for s in spans],
                    }
                ],
            }
        ]
    }


def test_http_json_with_partial_success(collector: Running) -> None:
    trace_hex = "4bf92f3577b34da6a3ce929d0e0e4736"
    doc = _json_request(
        trace_hex,
        [
            {
                "spanId": "00f067aa0ba902b7",
                "name": A.SPAN_PREFILL,
                "kind": 2,
                "startTimeUnixNano": str(T0_NS),
                "endTimeUnixNano": str(T0_NS + 25 * MS),
            },
            {
                "spanId": "00f067aa0ba902b8",
                "name": "bad.order",
                "kind": "SPAN_KIND_INTERNAL",
                "startTimeUnixNano": str(T0_NS + 5),
                "endTimeUnixNano": str(T0_NS),
            },
        ],
    )
    response = httpx.post(collector.otlp_http, json=doc, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    partial = response.json()["partialSuccess"]
    assert int(partial["rejectedSpans"]) == 1
    message = partial["errorMessage"]
    assert "bad.order" in message and "end_time_unix_nano" in message
    rows = _api_query(
        collector,
        f"SELECT SpanName, SpanKind, Timestamp FROM otel_traces WHERE TraceId = '{trace_hex}'",
    )
    assert rows == [{"SpanName": A.SPAN_PREFILL, "SpanKind": "Server", "Timestamp": _iso(T0_NS)}]
    parts = _api_query(
        collector,
        f"SELECT prefill_node, prefill_s FROM request_parts WHERE trace_id = '{trace_hex}'",
    )
    assert parts == [{"prefill_node": "prefill-9", "prefill_s": pytest.approx(0.025)}]


def test_http_protobuf_gzip(collector: Running) -> None:
    import gzip

    from google.protobuf import json_format

    trace_hex = "5bf92f3577b34da6a3ce929d0e0e4737"
    doc = _json_request(
        trace_hex,
        [
            {
                "spanId": "10f067aa0ba902b7",
                "name": A.SPAN_TOKEN,
                "startTimeUnixNano": str(T0_NS),
                "endTimeUnixNano": str(T0_NS + 3 * MS),
                "attributes": [{"key": A.TOKEN_INDEX, "value": {"intValue": "2"}}],
            }
        ],
    )
    import base64

    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    span["traceId"] = base64.b64encode(bytes.fromhex(trace_hex)).decode()
    span["spanId"] = base64.b64encode(bytes.fromhex(span["spanId"])).decode()
    body = json_format.ParseDict(doc, ExportTraceServiceRequest()).SerializeToString()
    response = httpx.post(
        collector.otlp_http,
        content=gzip.compress(body),
        timeout=30,
        headers={"content-type": "application/x-protobuf", "content-encoding": "gzip"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-protobuf"
    parsed = ExportTraceServiceResponse.FromString(response.content)
    assert not parsed.HasField("partial_success")
    rows = _cli_query(
        collector.data_dir,
        f"SELECT ts, node, token_index, itl_s FROM token_latencies WHERE trace_id = '{trace_hex}'",
    )
    assert rows == [
        {
            "ts": _iso(T0_NS + 3 * MS),
            "node": "prefill-9",
            "token_index": 2,
            "itl_s": pytest.approx(0.003),
        }
    ]


# -- malformed input ---------------------------------------------------------------------


def test_malformed_input_gets_clear_errors_and_collector_keeps_serving(collector: Running) -> None:
    before = httpx.get(f"{collector.api}/health", timeout=10).json()
    stored_before = _api_query(collector, "SELECT count() AS n FROM otel_traces")[0]["n"]
    from tokentrace.collector.ingest.otlp_parse import parse_json

    good = parse_json(
        json.dumps(
            _json_request(
                "6bf92f3577b34da6a3ce929d0e0e4738",
                [
                    {
                        "spanId": "20f067aa0ba902b7",
                        "name": "x" * 40,
                        "startTimeUnixNano": "1",
                        "endTimeUnixNano": "2",
                    }
                ],
            )
        )
    )
    truncated = good.SerializeToString()[:-10]

    with grpc.insecure_channel(collector.info["otlp_grpc"]) as channel:
        export = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            request_serializer=None,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            export(truncated, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid OTLP protobuf" in info.value.details()

    r = httpx.post(
        collector.otlp_http,
        content=truncated,
        timeout=10,
        headers={"content-type": "application/x-protobuf"},
    )
    assert r.status_code == 400 and "invalid OTLP protobuf" in r.json()["message"]
    assert r.json()["code"] == 3
    r = httpx.post(
        collector.otlp_http,
        content=b'{"resourceSpans": [',
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "invalid JSON" in r.json()["message"]
    r = httpx.post(
        collector.otlp_http, content=b"hello", timeout=10, headers={"content-type": "text/plain"}
    )
    assert r.status_code == 415 and "text/plain" in r.json()["message"]
    r = httpx.post(
        collector.otlp_http,
        content=b"not gzip",
        timeout=10,
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert r.status_code == 400 and "gzip" in r.json()["message"]

    bad_sql = httpx.post(f"{collector.api}/query", json={"sql": "SELECT 1 +"}, timeout=10)
    assert bad_sql.status_code == 400 and "Syntax error" in bad_sql.json()["error"]
    write = httpx.post(f"{collector.api}/query", json={"sql": "DROP TABLE otel_traces"}, timeout=10)
    assert write.status_code == 400 and "only reads are allowed" in write.json()["error"]
    cli = subprocess.run(
        _tokentrace("query", "SELECT 1 +", "--data-dir", str(collector.data_dir)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode == 1 and "Syntax error" in cli.stderr

    after = httpx.get(f"{collector.api}/health", timeout=10).json()
    assert after["status"] == "ok" and after["spans_stored"] == before["spans_stored"]
    assert _api_query(collector, "SELECT count() AS n FROM otel_traces")[0]["n"] == stored_before


# -- shutdown ----------------------------------------------------------------------------


def test_sigterm_drains_and_query_opens_the_store_directly(collector: Running) -> None:
    sql = "SELECT TraceId, SpanId, Timestamp FROM otel_traces ORDER BY TraceId, SpanId"
    live = _cli_query(collector.data_dir, sql)
    health = httpx.get(f"{collector.api}/health", timeout=10).json()
    assert len(live) == health["spans_stored"] > 0
    collector.proc.send_signal(signal.SIGTERM)
    assert collector.proc.wait(timeout=30) == 0
    assert not (collector.data_dir / "collector.json").exists()
    assert _cli_query(collector.data_dir, sql) == live
    csv_out = subprocess.run(
        _tokentrace(
            "query",
            "SELECT count() AS n FROM requests",
            "--data-dir",
            str(collector.data_dir),
            "--format",
            "csv",
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert csv_out.returncode == 0 and csv_out.stdout.splitlines() == ["n", "1"]
    # Opening the store directly, the CLI applies the same guard.
    refused = subprocess.run(
        _tokentrace(
            "query", "SELECT * FROM file('/etc/hostname')", "--data-dir", str(collector.data_dir)
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode != 0 and "refused: the table function file()" in refused.stderr
