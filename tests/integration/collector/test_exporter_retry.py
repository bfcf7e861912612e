"""The instrumentation's exporter against a collector that is not up yet: spans ended
while nothing listens are retried, and arrive once a real collector starts on that
port."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import httpx
import pytest
from collector_process import start_collector

from tokentrace.instrument import setup_tracing
from tokentrace.serving.procs import free_port

pytestmark = pytest.mark.timeout(180)

SDK_EXPORTER_LOG = "opentelemetry.exporter.otlp.proto.grpc.exporter"
SPANS = 20


def test_spans_ended_before_the_collector_is_up_arrive_once_it_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=SDK_EXPORTER_LOG)
    port = free_port()
    # Long enough an export timeout that the exporter's backoff (1, 2, 4, 8, 16 s) has
    # retries left after a collector's start on a loaded machine.
    tracing = setup_tracing(
        "decode",
        node_id="retry-node",
        endpoint=f"http://127.0.0.1:{port}",
        service_name="exporter-retry",
        export_timeout_s=60.0,
    )
    for i in range(SPANS):
        tracing.tracer.start_span(f"before-the-collector-{i}").end()

    # Wait until the exporter has the batch and its first attempt found nobody there.
    deadline = time.monotonic() + 60
    while not any("retrying" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the exporter never retried"
        time.sleep(0.05)
    counts = tracing.exporter_counts()
    assert counts is not None and counts.exporting == SPANS and counts.exported == 0

    proc, info, _ = start_collector(tmp_path / "data", "--otlp-grpc", f"127.0.0.1:{port}")
    try:
        assert info["otlp_grpc"] == f"127.0.0.1:{port}"
        tracing.shutdown()  # waits for the batch being retried
        counts = tracing.exporter_counts()
        assert counts is not None
        assert counts.exported == SPANS and counts.dropped == 0, counts
        body = httpx.post(
            f"http://{info['http']}/query",
            json={
                "sql": "SELECT count() FROM otel_traces WHERE ServiceName = 'exporter-retry' "
                "AND startsWith(SpanName, 'before-the-collector-')"
            },
            timeout=30,
        ).json()
        assert body["rows"] == [[SPANS]], body
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
