"""Reads apart from writes: while a multi-second query runs through the collector's SQL
API, exports are still acknowledged and stored. The query is held running by its size
and bounded by ``--query-timeout``; the test checks it is still running when the last
export has been stored, so no timing decides the outcome."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
from collector_process import start_collector
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from tokentrace.schemas import attributes as A

T0_NS = 1_700_000_000_000_000_000
LONG_QUERY = "SELECT sum(cityHash64(number)) FROM numbers(100000000000)"  # minutes of CPU
QUERY_TIMEOUT_S = 8
EXPORTS, SPANS = 8, 50


def _export(e: int) -> bytes:
    trace_id = (0xAB00 + e).to_bytes(16, "big")
    spans = [
        Span(
            trace_id=trace_id,
            span_id=(k + 1).to_bytes(8, "big"),
            name="work",
            start_time_unix_nano=T0_NS + k,
            end_time_unix_nano=T0_NS + k + 1000,
        )
        for k in range(SPANS)
    ]
    resource = Resource(attributes=[KeyValue(key=A.NODE_ID, value=AnyValue(string_value="rw"))])
    scope = ScopeSpans(spans=spans)
    request = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(resource=resource, scope_spans=[scope])]
    )
    return request.SerializeToString()


def test_exports_are_stored_while_a_long_query_runs(tmp_path: Path) -> None:
    proc, info, _ = start_collector(tmp_path, "--query-timeout", str(QUERY_TIMEOUT_S))
    api = f"http://{info['http']}"
    try:
        answer: list[httpx.Response] = []
        reader = threading.Thread(
            target=lambda: answer.append(
                httpx.post(f"{api}/query", json={"sql": LONG_QUERY}, timeout=120)
            )
        )
        reader.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{api}/health").json()["queries_running"] != 1:
            assert time.monotonic() < deadline, "the long query never started"
            time.sleep(0.05)
        for e in range(EXPORTS):
            resp = httpx.post(
                f"http://{info['otlp_http']}/v1/traces",
                content=_export(e),
                headers={"content-type": "application/x-protobuf"},
                timeout=60,
            )
            assert resp.status_code == 200, resp.text
        # Every export acknowledged (durable in the log) and then inserted with its block
        # while the query still runs: the inserts did not wait for it. (/health reads
        # nothing from ClickHouse, so asking it does not hurry the inserts.)
        while (health := httpx.get(f"{api}/health").json())["spans_stored"] < EXPORTS * SPANS:
            assert health["queries_running"] == 1, health
            time.sleep(0.05)
        assert health["spans_stored"] == EXPORTS * SPANS, health
        assert health["queries_running"] == 1, health
        reader.join(timeout=QUERY_TIMEOUT_S + 60)
        (resp,) = answer
        assert resp.status_code == 422 and "max_execution_time" in resp.text, resp.text
        # ...and once it ended, the same data is there to read.
        count = httpx.post(
            f"{api}/query",
            json={
                "sql": "SELECT count() FROM otel_traces WHERE ResourceAttributes['"
                + A.NODE_ID
                + "'] = 'rw'"
            },
            timeout=60,
        ).json()["rows"]
        assert count == [[EXPORTS * SPANS]]
    finally:
        proc.kill()
        proc.wait()
