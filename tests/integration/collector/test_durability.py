"""What the write-ahead log promises, against real collector processes.

A sender streams numbered spans over OTLP/gRPC and, as OTLP exporters do, sends an
export again when it got no answer or a retryable error. Whatever happens to the
collector meanwhile (``kill -9``, its ClickHouse disk full for 20 s, its disk budget
used up), ClickHouse ends up with every span exactly once.

The store outages are real: the collector runs in its own mount namespace with its
embedded ClickHouse on a small tmpfs, and the test fills that tmpfs (through
``/proc/PID/root``) until ClickHouse refuses inserts with NOT_ENOUGH_SPACE, then frees it.
For ``kill -9`` the writer is held by a ClickHouse server that does not answer, so the
kill always finds acknowledged exports that are only in the log.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from collector_process import start_collector
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from prometheus_client.parser import text_string_to_metric_families

from tokentrace.schemas import attributes as A
from tokentrace.serving.procs import free_ports

pytestmark = pytest.mark.timeout(300)

T0_NS = 1_700_000_000_000_000_000
_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


def _exports(run: int, n_exports: int, spans_per_export: int) -> list[bytes]:
    """Serialized exports, each one trace: an ``llm.request`` span and numbered children.
    ``run`` keeps different tests' trace ids apart."""
    out = []
    for e in range(n_exports):
        trace_id = run.to_bytes(4, "big") + e.to_bytes(12, "big")
        spans = []
        for k in range(spans_per_export):
            start = T0_NS + e * 1_000_000 + k
            spans.append(
                Span(
                    trace_id=trace_id,
                    span_id=(e * spans_per_export + k + 1).to_bytes(8, "big"),
                    parent_span_id=b"" if k == 0 else (e * spans_per_export + 1).to_bytes(8, "big"),
                    name=A.SPAN_REQUEST if k == 0 else "work",
                    start_time_unix_nano=start,
                    end_time_unix_nano=start + 1000,
                    attributes=[
                        KeyValue(key=A.REQUEST_ID, value=AnyValue(string_value=f"r{run}-{e}"))
                    ]
                    if k == 0
                    else [],
                )
            )
        resource = Resource(
            attributes=[KeyValue(key=A.NODE_ID, value=AnyValue(string_value="sender"))]
        )
        request = ExportTraceServiceRequest(
            resource_spans=[ResourceSpans(resource=resource, scope_spans=[ScopeSpans(spans=spans)])]
        )
        out.append(request.SerializeToString())
    return out


class Sender(threading.Thread):
    """Sends ``exports`` in order, each until it is acknowledged, ``pause_s`` apart;
    counts acknowledgements and the retryable codes it was answered with."""

    def __init__(self, target: str, exports: list[bytes], pause_s: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.exports = exports
        self.pause_s = pause_s
        self.acked = 0
        self.codes: dict[grpc.StatusCode, int] = {}
        self.retry_delays: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with grpc.insecure_channel(self.target) as channel:
                export = channel.unary_unary(
                    _EXPORT,
                    request_serializer=None,
                    response_deserializer=ExportTraceServiceResponse.FromString,
                )
                for wire in self.exports:
                    self._send(export, wire)
                    self.acked += 1
                    time.sleep(self.pause_s)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def _send(self, export: Any, wire: bytes) -> None:
        deadline = time.monotonic() + 120
        while True:
            try:
                response = export(wire, timeout=10)
                assert not response.partial_success.rejected_spans
                return
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in _RETRYABLE and code != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                self.codes[code] = self.codes.get(code, 0) + 1
                trailers = dict(exc.trailing_metadata() or ())
                if "google.rpc.retryinfo-bin" in trailers:
                    info = RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"])
                    self.retry_delays.append(info.retry_delay.seconds)
            if time.monotonic() > deadline:
                raise AssertionError("an export was not acknowledged within 120 s")
            time.sleep(0.1)


class Collector:
    """A collector process on fixed ports, so it can be restarted where senders expect it."""

    def __init__(self, data_dir: Path, *extra: str, tmpfs_store: bool = False) -> None:
        self.data_dir = data_dir
        grpc_port, http_port, api_port = free_ports(3)
        self.args = (
            *("--otlp-grpc", f"127.0.0.1:{grpc_port}"),
            *("--otlp-http", f"127.0.0.1:{http_port}"),
            *("--http", f"127.0.0.1:{api_port}"),
            *extra,
        )
        self.grpc = f"127.0.0.1:{grpc_port}"
        self.otlp_http = f"http://127.0.0.1:{http_port}/v1/traces"
        self.api = f"http://127.0.0.1:{api_port}"
        self.store_dir = data_dir / "clickhouse"
        self.prefix: tuple[str, ...] = ()
        if tmpfs_store:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            mount = 'mount -t tmpfs -o size=128m tokentrace-test "$0" && exec "$@"'
            self.prefix = ("unshare", "--mount", "--propagation", "private")
            self.prefix += ("sh", "-c", mount, str(self.store_dir))
        self.proc: subprocess.Popen[str] | None = None

    def start(self, *more: str) -> None:
        """Start (again) on the same ports and log; ``more``: arguments for this start
        only (``--clickhouse DSN`` instead of the embedded store)."""
        self.proc, _, _ = start_collector(self.data_dir, *self.args, *more, prefix=self.prefix)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.api}/health", timeout=10).json())

    def query(self, sql: str) -> list[list[Any]]:
        response = httpx.post(f"{self.api}/query", json={"sql": sql}, timeout=60)
        assert response.status_code == 200, response.text
        return list(response.json()["rows"])

    def fill_store_disk(self) -> Path:
        """Fill the store's tmpfs (as the collector's mount namespace sees it)."""
        assert self.proc is not None
        filler = Path(f"/proc/{self.proc.pid}/root{self.store_dir}/filler")
        chunk = bytes(1 << 20)
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(chunk)
                    f.flush()
            except OSError:
                pass
        return filler

    def wait_for(self, what: str, check: Any, timeout_s: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            health = self.health()
            if check(health):
                return health
            if time.monotonic() > deadline:
                raise AssertionError(f"collector never reached: {what}; /health: {health}")
            time.sleep(0.2)


@pytest.fixture
def collectors() -> Iterator[list[Collector]]:
    made: list[Collector] = []
    yield made
    for c in made:
        c.stop()


def _stored(collector: Collector, run: int) -> tuple[int, int, int]:
    """(span rows, distinct span ids, request rows) of one run's traces."""
    prefix = run.to_bytes(4, "big").hex()
    ((rows, distinct),) = collector.query(
        f"SELECT count(), uniqExact(TraceId, SpanId) FROM otel_traces "
        f"WHERE startsWith(TraceId, '{prefix}')"
    )
    ((requests,),) = collector.query(
        f"SELECT count() FROM request_parts WHERE startsWith(trace_id, '{prefix}')"
    )
    return int(rows), int(distinct), int(requests)


def test_kill_9_mid_stream_stores_every_span_exactly_once(
    tmp_path: Path, collectors: list[Collector]
) -> None:
    """kill -9 while senders stream, with acknowledged exports still only in the log: the
    ClickHouse writer is held (the collector first runs against a ClickHouse server that
    does not answer, so every export is acknowledged at its fsync and none inserted),
    and the restart, on the embedded store, must replay them all from the log and
    recognise the ones the senders send again. No timing decides what the kill catches."""
    exports = _exports(run=1, n_exports=200, spans_per_export=500)  # 100,000 spans
    collector = Collector(tmp_path)
    collectors.append(collector)
    (closed_port,) = free_ports(1)  # nothing listens there
    collector.start("--clickhouse", f"http://127.0.0.1:{closed_port}")
    senders = [Sender(collector.grpc, exports[k::4]) for k in range(4)]
    for sender in senders:
        sender.start()
    while sum(s.acked for s in senders) < len(exports) // 3:
        assert all(s.is_alive() for s in senders)
        time.sleep(0.01)
    held = collector.health()
    assert held["spans_stored"] == 0 and held["wal_pending_records"] > 0, held
    collector.kill()
    acked_at_kill = sum(s.acked for s in senders)
    assert acked_at_kill < len(exports), "the kill must land mid-stream"
    time.sleep(1.0)  # the senders meet a dead port and keep retrying
    collector.start()  # the embedded store this time: the writer runs
    for sender in senders:
        sender.join(timeout=240)
        assert sender.error is None and sender.acked == len(sender.exports)
    assert sum(s.codes.get(grpc.StatusCode.UNAVAILABLE, 0) for s in senders) > 0
    health = collector.wait_for("log drained", lambda h: h["wal_pending_records"] == 0)
    assert health["spans_lost"] == 0
    # Every record pending when the kill landed came back from the log.
    assert health["wal_replayed_records"] >= held["wal_pending_records"]

    rows, distinct, requests = _stored(collector, run=1)
    assert (rows, distinct) == (100_000, 100_000)
    assert requests == len(exports)


def test_store_out_of_disk_for_20s_loses_nothing(
    tmp_path: Path, collectors: list[Collector]
) -> None:
    exports = _exports(run=2, n_exports=120, spans_per_export=250)  # 30,000 spans, ~36 s
    collector = Collector(tmp_path, tmpfs_store=True)
    collectors.append(collector)
    collector.start()
    sender = Sender(collector.grpc, exports, pause_s=0.3)
    sender.start()
    while sender.acked < 10 and sender.is_alive():
        time.sleep(0.05)
    filler = collector.fill_store_disk()
    down = collector.wait_for("ClickHouse failing", lambda h: not h["store_ok"])
    assert "NOT_ENOUGH_SPACE" in down["store_error"] or "space" in down["store_error"]
    time.sleep(20)
    during = collector.health()
    assert during["wal_pending_records"] > 0 and not during["store_ok"]
    acked_during = sender.acked
    filler.unlink()
    sender.join(timeout=240)
    assert sender.error is None and sender.acked == len(exports)
    # The exporter never noticed: every export was acknowledged at its first attempt.
    assert sender.codes == {}
    assert acked_during > 10 + 20 / 0.3 / 2  # accepted all through the outage
    after = collector.wait_for(
        "backlog inserted", lambda h: h["wal_pending_records"] == 0 and h["store_ok"]
    )
    assert after["spans_lost"] == 0 and after["store_errors"] > 0
    assert _stored(collector, run=2) == (30_000, 30_000, len(exports))


def test_past_the_disk_budget_exporters_get_retryable_errors(
    tmp_path: Path, collectors: list[Collector]
) -> None:
    exports = _exports(run=3, n_exports=60, spans_per_export=250)  # 15,000 spans
    budget = 256 * 1024  # about 20 exports
    collector = Collector(tmp_path, "--wal-max-bytes", str(budget), tmpfs_store=True)
    collectors.append(collector)
    collector.start()
    filler = collector.fill_store_disk()
    sender = Sender(collector.grpc, exports)
    sender.start()
    full = collector.wait_for(
        "disk budget full", lambda h: h["wal_pending_bytes"] >= budget, timeout_s=60
    )
    assert full["wal_max_bytes"] == budget
    time.sleep(2)  # the sender is being refused and retries
    assert sender.is_alive() and sender.acked < len(exports)
    assert sender.codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0) > 0
    assert sender.retry_delays and all(d >= 1 for d in sender.retry_delays)
    response = httpx.post(
        collector.otlp_http,
        content=exports[-1],
        headers={"content-type": "application/x-protobuf"},
        timeout=10,
    )
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert "disk budget" in response.json()["message"]
    refused = collector.health()["spans_refused"]
    assert refused > 0

    filler.unlink()
    sender.join(timeout=240)
    assert sender.error is None and sender.acked == len(exports)
    collector.wait_for("backlog inserted", lambda h: h["wal_pending_records"] == 0)
    assert _stored(collector, run=3) == (15_000, 15_000, len(exports))


def test_a_clickhouse_server_down_from_the_start_costs_nothing(
    tmp_path: Path, collectors: list[Collector]
) -> None:
    """A collector whose ClickHouse server does not answer starts anyway and keeps what
    it is sent in its log; SIGTERM leaves it there, and a collector started on the same
    log with a store that works inserts all of it."""
    (dead_port,) = free_ports(1)
    dsn = f"http://127.0.0.1:{dead_port}"
    wal = tmp_path / "wal"
    exports = _exports(run=4, n_exports=10, spans_per_export=100)
    first = Collector(tmp_path / "first", "--clickhouse", dsn, "--wal-dir", str(wal))
    collectors.append(first)
    first.start()
    sender = Sender(first.grpc, exports)
    sender.run()
    assert sender.error is None and sender.acked == len(exports) and sender.codes == {}
    health = first.wait_for("an insert attempt failed", lambda h: h["store_errors"] > 0)
    assert not health["store_ok"] and f"127.0.0.1:{dead_port}" in health["store_error"]
    assert health["wal_pending_records"] > 0 and health["spans_stored"] == 0
    # /metrics tells the same story, and how long the oldest unstored record has waited.
    text = httpx.get(f"{first.api}/metrics", timeout=10).text
    scraped = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert scraped["tokentrace_collector_wal_pending_records"] == health["wal_pending_records"]
    assert scraped["tokentrace_collector_spans_stored_total"] == 0
    assert scraped["tokentrace_collector_store_ok"] == 0
    assert scraped["tokentrace_collector_store_lag_seconds"] > 0
    response = httpx.post(f"{first.api}/query", json={"sql": "SELECT 1"}, timeout=10)
    assert response.status_code == 503 and dsn in response.json()["error"]
    first.stop()  # waits for ClickHouse a while, then leaves the spans in the log
    assert first.proc is not None and first.proc.returncode == 0

    second = Collector(tmp_path / "second", "--wal-dir", str(wal))
    collectors.append(second)
    second.start()
    replayed = second.wait_for("log drained", lambda h: h["wal_pending_records"] == 0)
    assert replayed["wal_replayed_records"] > 0
    assert _stored(second, run=4) == (1000, 1000, len(exports))


def test_a_block_goes_in_at_its_interval_or_its_size_whichever_comes_first(
    tmp_path: Path, collectors: list[Collector]
) -> None:
    """`--insert-interval` and `--insert-block-bytes` decide when the log's records go
    into ClickHouse: with an hour's interval a small export waits (acknowledged, in the
    log), and the export that takes the waiting bytes past the block size sends both."""
    collector = Collector(tmp_path, "--insert-interval", "3600", "--insert-block-bytes", "64K")
    collectors.append(collector)
    collector.start()
    small, large = _exports(run=5, n_exports=1, spans_per_export=10) + _exports(
        run=6, n_exports=1, spans_per_export=3000
    )
    assert len(small) < 64 << 10 < len(large)
    _send_one(collector, small)
    time.sleep(2.0)  # twice the default interval: an ignored flag would have inserted it
    waiting = collector.health()
    assert (waiting["wal_pending_records"], waiting["spans_stored"]) == (1, 0), waiting
    _send_one(collector, large)
    stored = collector.wait_for("the block inserted", lambda h: h["wal_pending_records"] == 0)
    assert stored["spans_stored"] == 3010 and stored["spans_lost"] == 0, stored


def _send_one(collector: Collector, wire: bytes) -> None:
    """Send ``wire`` and return once it is acknowledged."""
    sender = Sender(collector.grpc, [wire])
    sender.run()
    assert sender.error is None and sender.acked == 1, sender.error
