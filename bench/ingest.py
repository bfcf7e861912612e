"""Collector ingest: spans per second per collector core, OTLP/gRPC in → rows committed.

A separate sender process streams realistic exports (per LLM request: the router's
``llm.request``, the prefill's ``llm.prefill``, the decode node's ``llm.decode``,
``llm.kv_transfer`` and one ``llm.token`` per output token — or, in packed mode, the
tokens packed onto ``llm.decode``) with several exports in flight, as fast as the
collector acknowledges them. An export is acknowledged once it is in the collector's
log; the run ends with a read, which first inserts everything acknowledged (embedded
chDB), so the collector's CPU time over the run covers everything: gRPC, parsing,
derivation, inserts, ClickHouse's own parsing, part writes and merges. Figures are
spans (and token rows) stored per collector CPU-second.

Baselines, same run: a receiver that only parses each export with the protobuf runtime
and discards it, fed by the same sender (the floor for any Python OTLP receiver); and
the store's own insert rate for the same rows, decoded once and inserted in blocks of
64 exports into a fresh embedded store (what ClickHouse itself costs: the limit).
Also: the bytes every table takes on disk per token stored, and peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from bench._common import (
    Figure,
    RssSampler,
    add_common_args,
    collector_argv,
    cpu_seconds,
    emit,
    rss_bytes,
)
from tokentrace.schemas import attributes as A

ROOT = Path(__file__).resolve().parents[1]  # where `python -m bench.ingest` is found
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
MS = 1_000_000


# -- the workload ----------------------------------------------------------------------


def _kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def _resource(node: str, role: str) -> ResourceSpans:
    rs = ResourceSpans()
    for key, value in (
        (A.SERVICE_NAME, f"tokentrace-{role}"),
        (A.HOST_NAME, f"host-{node}"),
        (A.NODE_ID, node),
        (A.ROLE, role),
        ("telemetry.sdk.language", "python"),
        ("telemetry.sdk.name", "opentelemetry"),
        ("telemetry.sdk.version", "1.45.2"),
    ):
        rs.resource.attributes.append(_kv(key, value))
    return rs


def _span(
    trace_id: bytes,
    span_id: int,
    parent: int,
    name: str,
    kind: int,
    start: int,
    end: int,
    attrs: dict[str, Any],
) -> Span:
    span = Span(
        trace_id=trace_id,
        span_id=span_id.to_bytes(8, "big"),
        parent_span_id=parent.to_bytes(8, "big") if parent else b"",
        name=name,
        kind=kind,  # type: ignore[arg-type]
        start_time_unix_nano=start,
        end_time_unix_nano=end,
    )
    span.attributes.extend(_kv(k, v) for k, v in attrs.items())
    return span


@dataclass(frozen=True)
class Template:
    """One export of ``requests`` LLM requests, and the trace ids to vary per send."""

    data: bytes
    trace_ids: list[bytes]
    spans: int
    token_rows: int

    def fresh(self, rng: random.Random) -> bytes:
        """The export with new random trace ids: distinct traces every send."""
        data = self.data
        for trace_id in self.trace_ids:
            data = data.replace(trace_id, rng.randbytes(16))
        return data


def build_template(requests: int, tokens: int, packed: bool, seed: int = 1) -> Template:
    """An export as three processes would send it, in one request: the router's, the
    prefill worker's and the decode worker's spans of ``requests`` LLM requests."""
    from array import array

    from tokentrace.schemas.packed import encode_packed

    rng = random.Random(seed)
    router, prefill, decode = (
        _resource("router-0", "router"),
        _resource("prefill-0", "prefill"),
        _resource("decode-0", "decode"),
    )
    scopes = {id(rs): ScopeSpans() for rs in (router, prefill, decode)}
    for scope in scopes.values():
        scope.scope.name = "tokentrace"
    trace_ids = []
    spans = 0
    t0 = time.time_ns()
    for r in range(requests):
        trace_id = rng.randbytes(16)
        trace_ids.append(trace_id)
        ids = iter(rng.getrandbits(63) | 1 for _ in range(8))
        root, pre, dec, kv = next(ids), next(ids), next(ids), next(ids)
        start = t0 + r * 50 * MS
        scopes[id(router)].spans.append(
            _span(
                trace_id,
                root,
                0,
                A.SPAN_REQUEST,
                Span.SPAN_KIND_SERVER,
                start,
                start + 600 * MS,
                {
                    A.GEN_AI_OPERATION_NAME: "text_completion",
                    A.REQUEST_ID: f"cmpl-{rng.getrandbits(64):016x}",
                    A.GEN_AI_REQUEST_MODEL: "tt-tiny",
                    A.GEN_AI_REQUEST_MAX_TOKENS: tokens,
                    A.STREAM: True,
                    A.GEN_AI_USAGE_INPUT_TOKENS: 256,
                    A.GEN_AI_USAGE_OUTPUT_TOKENS: tokens,
                    A.GEN_AI_SERVER_TTFT: 0.061,
                    A.PREFILL_NODE: "prefill-0",
                    A.DECODE_NODE: "decode-0",
                    A.PREFILL_URL: "http://127.0.0.1:8100",
                    A.DECODE_URL: "http://127.0.0.1:8200",
                    A.PREFILL_SENT_NS: start + MS,
                    A.DECODE_SENT_NS: start + 40 * MS,
                    A.PREFILL_CLOCK_OFFSET_S: 0.0001,
                    A.PREFILL_CLOCK_ERROR_S: 0.0004,
                    A.DECODE_CLOCK_OFFSET_S: -0.0002,
                    A.DECODE_CLOCK_ERROR_S: 0.0003,
                    A.HTTP_STATUS: 200,
                },
            )
        )
        scopes[id(prefill)].spans.append(
            _span(
                trace_id,
                pre,
                root,
                A.SPAN_PREFILL,
                Span.SPAN_KIND_SERVER,
                start + 2 * MS,
                start + 35 * MS,
                {
                    A.GEN_AI_REQUEST_MODEL: "tt-tiny",
                    A.REQUEST_ID: "r",
                    A.GEN_AI_USAGE_INPUT_TOKENS: 256,
                    A.QUEUE_TIME_S: 0.001,
                    A.COMPUTE_TIME_S: 0.03,
                },
            )
        )
        d_start = start + 41 * MS
        decode_attrs: dict[str, Any] = {
            A.GEN_AI_REQUEST_MODEL: "tt-tiny",
            A.REQUEST_ID: "r",
            A.GEN_AI_USAGE_OUTPUT_TOKENS: tokens,
            A.GEN_AI_SERVER_TTFT: 0.02,
        }
        gaps = [rng.randint(2 * MS, 6 * MS) for _ in range(tokens)]
        ends = [d_start + 5 * MS + sum(gaps[: i + 1]) for i in range(tokens)]
        if packed:
            times = array("q", [5 * MS] + [e - d_start for e in ends])
            steps = array("q", range(1000 + r, 1000 + r + tokens))
            # Version 2, as tokentrace's workers send it (with each step's prefill count).
            decode_attrs[A.TOKEN_PACKED] = encode_packed(
                times,
                steps,
                array("H", [1] * tokens),
                array("H", [8] * tokens),
                array("I", [0] * tokens),
            )
        decode_scope = scopes[id(decode)].spans
        decode_scope.append(
            _span(
                trace_id,
                dec,
                root,
                A.SPAN_DECODE,
                Span.SPAN_KIND_SERVER,
                d_start,
                ends[-1],
                decode_attrs,
            )
        )
        decode_scope.append(
            _span(
                trace_id,
                kv,
                dec,
                A.SPAN_KV_TRANSFER,
                Span.SPAN_KIND_CLIENT,
                d_start + MS,
                d_start + 4 * MS,
                {
                    A.KV_BYTES: 1 << 20,
                    A.KV_BLOCKS: 16,
                    A.KV_BACKEND: "nixl/UCX",
                    A.KV_SRC_NODE: "prefill-0",
                    A.KV_DST_NODE: "decode-0",
                    A.KV_DESCRIPTORS: 16,
                },
            )
        )
        spans += 4
        if not packed:
            prev = d_start + 5 * MS
            for i, end in enumerate(ends):
                decode_scope.append(
                    _span(
                        trace_id,
                        next(ids) if i < 4 else rng.getrandbits(63) | 1,
                        dec,
                        A.SPAN_TOKEN,
                        Span.SPAN_KIND_INTERNAL,
                        prev,
                        end,
                        {  # as tokentrace's workers send them (instrument/recorder.py)
                            A.EMISSION_INDEX: i,
                            A.TOKEN_INDEX: i,
                            A.TOKEN_COUNT: 1,
                            A.ENGINE_STEP: 1000 + r + i,
                            A.BATCH_SIZE: 8,
                            A.STEP_PREFILL_TOKENS: 0,
                        },
                    )
                )
                prev = end
        spans += tokens  # packed: expanded by the collector into as many spans
    request = ExportTraceServiceRequest()
    for rs in (router, prefill, decode):
        rs.scope_spans.append(scopes[id(rs)])
        request.resource_spans.append(rs)
    return Template(request.SerializeToString(), trace_ids, spans, requests * tokens)


# -- the sender (its own process) --------------------------------------------------------


def _sender(
    target: str, seconds: float, inflight: int, packed: bool, requests: int, tokens: int
) -> dict[str, Any]:
    template = build_template(requests, tokens, packed)
    channel = grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
        ],
    )
    export = channel.unary_unary(EXPORT_METHOD)  # bytes in, bytes out
    rng = random.Random(os.getpid())
    sent = failed = 0
    lock = threading.Lock()
    slots = threading.Semaphore(inflight)
    deadline = time.monotonic() + seconds

    def done(fut: grpc.Future) -> None:
        nonlocal sent, failed
        with lock:
            if fut.exception() is None:
                sent += 1
            else:
                failed += 1
        slots.release()

    while time.monotonic() < deadline:
        data = template.fresh(rng)
        slots.acquire()
        export.future(data, timeout=60).add_done_callback(done)
    for _ in range(inflight):
        slots.acquire()
    channel.close()
    return {
        "exports": sent,
        "failed": failed,
        "spans": sent * template.spans,
        "token_rows": sent * template.token_rows,
    }


def _run_sender(
    target: str, seconds: float, args: argparse.Namespace, packed: bool
) -> dict[str, Any]:
    return dict(
        _bench_json(
            "--sender",
            target,
            "--seconds",
            str(seconds),
            "--inflight",
            str(args.inflight),
            *_workload_args(args, packed),
        )
    )


def _workload_args(args: argparse.Namespace, packed: bool) -> list[str]:
    return [
        "--requests-per-export",
        str(args.requests_per_export),
        "--tokens",
        str(args.tokens),
        *(["--packed"] if packed else []),
    ]


def _bench_json(*argv: str) -> Any:
    """``python -m bench.ingest ARGV`` in a process of its own; what it prints, as JSON."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.ingest", *argv],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout)


# -- the store's own insert rate for the same rows (its own process) ------------------


def _raw_insert(seconds: float, packed: bool, requests: int, tokens: int) -> dict[str, Any]:
    """Decode one export once, then insert its rows into a fresh embedded store as the
    collector's inserter does (one insert per table per block of 64 exports), for
    ``seconds``: what ClickHouse itself costs for these rows, without receiving,
    parsing, logging or decoding them. CPU is this process's (chDB runs inside it)."""
    from tokentrace.collector.ingest.decode import SpanBatch, decode_wire
    from tokentrace.collector.ingest.derive import DerivedRows, derive_rows
    from tokentrace.collector.ingest.pipeline import store_tables
    from tokentrace.collector.store import open_store

    template = build_template(requests, tokens, packed)
    one = decode_wire(template.data)
    batch, rows = SpanBatch(), DerivedRows()
    for _ in range(64):
        batch.extend(one)
        rows.extend(derive_rows(one))
    tables = store_tables(batch, rows)
    with tempfile.TemporaryDirectory(prefix="tt-bench-raw-") as tmp:
        store = open_store(f"chdb://{tmp}/clickhouse")
        try:
            blocks = 0
            cpu0 = time.process_time()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for table, columns in tables:
                    store.insert(table, columns)
                blocks += 1
            cpu = time.process_time() - cpu0
        finally:
            store.close()
    return {
        "cpu_s": cpu,
        "spans": blocks * 64 * template.spans,
        "token_rows": blocks * 64 * template.token_rows,
    }


def measure_raw_insert(args: argparse.Namespace, packed: bool, seconds: float) -> Measured:
    got = _bench_json("--raw-insert", "--seconds", str(seconds), *_workload_args(args, packed))
    return Measured(got["spans"], got["token_rows"], got["cpu_s"], seconds, 0)


# -- the parse-only baseline receiver (its own process) ---------------------------------


def _parse_only_server(port_file: str) -> None:
    parsed = [0]

    def export(data: bytes, context: Any) -> bytes:
        request = ExportTraceServiceRequest.FromString(data)
        parsed[0] += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        return ExportTraceServiceResponse().SerializeToString()

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        options=[("grpc.max_receive_message_length", 64 << 20)],
    )
    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(port_file).write_text(str(port))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0)


@contextmanager
def _process(
    argv: list[str], ready: Path, timeout_s: float = 60.0
) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"{argv[:4]} did not start: {err[-2000:]}")
            time.sleep(0.05)
        time.sleep(0.1)  # the file is written before it is flushed
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- measurement -----------------------------------------------------------------------


@dataclass
class Measured:
    spans: int
    token_rows: int
    cpu_s: float
    wall_s: float
    peak_rss: int
    peak_anon: int = 0
    disk_bytes: int = 0  # every table's parts, after the run
    emission_bytes: int = 0  # token_emissions' parts
    tokens_stored: int = 0  # over the whole run, warm-up included

    @property
    def spans_per_core_s(self) -> float:
        return self.spans / self.cpu_s if self.cpu_s > 0 else float("nan")

    @property
    def token_rows_per_core_s(self) -> float:
        return self.token_rows / self.cpu_s if self.cpu_s > 0 else float("nan")


def _count(api: str, table: str) -> int:
    body = httpx.post(
        f"{api}/query", json={"sql": f"SELECT count() FROM {table}"}, timeout=120
    ).json()
    return int(body["rows"][0][0])


def measure_collector(args: argparse.Namespace, packed: bool) -> tuple[Measured, int]:
    """Ingest into a fresh collector; returns what was measured and its idle RSS."""
    with tempfile.TemporaryDirectory(prefix="tt-bench-ingest-") as tmp:
        data_dir = Path(tmp)
        argv = collector_argv(data_dir)
        argv += ["--insert-interval", str(args.insert_interval)]
        argv += ["--insert-block-bytes", args.insert_block_bytes]
        with _process(argv, data_dir / "collector.json") as proc:
            info = json.loads((data_dir / "collector.json").read_text())
            api = f"http://{info['http']}"
            idle_rss = rss_bytes(proc.pid)
            _run_sender(info["otlp_grpc"], args.warmup, args, packed)
            # A read first inserts everything acknowledged before it: the counts below
            # are of rows in ClickHouse, and the CPU up to them includes inserting them.
            tokens0 = _count(api, "tokentrace.token_latencies")
            spans0 = httpx.get(f"{api}/health", timeout=30).json()["spans_stored"]
            sampler = RssSampler(proc.pid)
            cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
            sent = _run_sender(info["otlp_grpc"], args.seconds, args, packed)
            tokens1 = _count(api, "tokentrace.token_latencies")
            cpu1, wall1 = cpu_seconds(proc.pid), time.monotonic()
            peak = sampler.stop()
            if sent["failed"]:
                raise RuntimeError(f"{sent['failed']} exports failed")
            spans1 = httpx.get(f"{api}/health", timeout=30).json()["spans_stored"]
            measured = Measured(
                spans1 - spans0,
                tokens1 - tokens0,
                cpu1 - cpu0,
                wall1 - wall0,
                max(peak, rss_bytes(proc.pid, "VmHWM")),
                sampler.peak_anon,
            )
            tokens_stored = tokens1
        # The collector has stopped and let go of its store: how much disk it took.
        measured.disk_bytes, measured.emission_bytes = _disk_bytes(data_dir)
        measured.tokens_stored = tokens_stored
        return measured, idle_rss


def _disk_bytes(data_dir: Path) -> tuple[int, int]:
    """Bytes of every tokentrace table's active parts, and of token_emissions' (in a
    process of its own: chDB opens one store per process)."""
    every, emissions = _bench_json("--disk-bytes", str(data_dir))
    return int(every), int(emissions)


def _print_disk_bytes(data_dir: str) -> None:
    from tokentrace.collector.store import open_store

    store = open_store(f"chdb://{Path(data_dir) / 'clickhouse'}")
    try:
        store.command("OPTIMIZE TABLE tokentrace.token_emissions FINAL")
        result = store.query(
            "SELECT sum(bytes_on_disk), sumIf(bytes_on_disk, table = 'token_emissions') "
            "FROM system.parts WHERE active AND database = 'tokentrace'"
        )
        print(json.dumps([int(v) for v in result.rows[0]]))
    finally:
        store.close()


def measure_parse_only(args: argparse.Namespace, packed: bool, seconds: float) -> Measured:
    with tempfile.TemporaryDirectory(prefix="tt-bench-parse-") as tmp:
        port_file = Path(tmp) / "port"
        argv = [sys.executable, "-m", "bench.ingest", "--parse-only-server", str(port_file)]
        with _process(argv, port_file) as proc:
            target = f"127.0.0.1:{port_file.read_text().strip()}"
            _run_sender(target, min(args.warmup, 2.0), args, packed)
            cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
            sent = _run_sender(target, seconds, args, packed)
            cpu1, wall1 = cpu_seconds(proc.pid), time.monotonic()
            wire_spans = (
                sent["spans"] if not packed else sent["exports"] * (args.requests_per_export * 4)
            )
            return Measured(
                wire_spans,
                sent["token_rows"],
                cpu1 - cpu0,
                wall1 - wall0,
                rss_bytes(proc.pid, "VmHWM"),
            )


def run(args: argparse.Namespace) -> list[Figure]:
    figures: list[Figure] = []
    modes = {"spans": [False], "packed": [True], "both": [False, True]}[args.mode]
    for packed in modes:
        label = "packed" if packed else "one span per token"
        measured, idle_rss = measure_collector(args, packed)
        baseline = measure_parse_only(args, packed, max(2.0, args.seconds / 3))
        limit = measure_raw_insert(args, packed, max(2.0, args.seconds / 3))
        if not packed:
            rate, unit, target = measured.spans_per_core_s, "spans/s/core", 150_000
            parse_rate, raw_rate = baseline.spans_per_core_s, limit.spans_per_core_s
        else:
            rate, unit, target = measured.token_rows_per_core_s, "rows/s/core", 1_000_000
            parse_rate, raw_rate = baseline.token_rows_per_core_s, limit.token_rows_per_core_s
        what = "spans stored" if not packed else "token rows stored"
        figures.append(
            Figure(
                f"ingest ({label}): {what} / collector CPU-s",
                rate,
                unit,
                parse_rate,
                f"≥ {target:,}",
                rate >= target,
                "parse-only receiver",
            )
        )
        figures.append(
            Figure(
                f"ingest ({label}): the store's own insert rate, same rows",
                raw_rate,
                unit,
                rate,
                "(the limit)",
                None,
                "end to end (above)",
            )
        )
        tokens_stored = max(measured.tokens_stored, 1)
        if packed:
            per_token = measured.emission_bytes / tokens_stored
            figures.append(
                Figure(
                    f"ingest ({label}): token_emissions on disk per token",
                    per_token,
                    "bytes",
                    None,
                    "≤ 8 bytes",
                    per_token <= 8,
                )
            )
        figures.append(
            Figure(
                f"ingest ({label}): every table on disk per token (spans, requests too)",
                measured.disk_bytes / tokens_stored,
                "bytes",
                None,
                "(information)",
                None,
            )
        )
        figures.append(
            Figure(
                f"ingest ({label}): spans stored per wall second",
                measured.spans / measured.wall_s,
                "spans/s",
                None,
                "(information)",
                None,
            )
        )
        figures.append(
            Figure(
                f"ingest ({label}): collector peak RSS at full load",
                measured.peak_rss / 1e6,
                "MB",
                idle_rss / 1e6,
                "≤ 400 MB",
                measured.peak_rss <= 400e6,
                "the same collector, idle",
            )
        )
        figures.append(
            Figure(
                f"ingest ({label}): of which anonymous (not chDB's code)",
                measured.peak_anon / 1e6,
                "MB",
                None,
                "(information)",
                None,
            )
        )
    return figures


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description="Collector ingest throughput per core, OTLP/gRPC in to rows committed "
        "in the embedded ClickHouse, fed by a separate sender process; baseline: a "
        "parse-only OTLP receiver fed the same way.",
    )
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="measured sending time per mode (default 30)"
    )
    parser.add_argument(
        "--warmup", type=float, default=5.0, help="unmeasured sending first (default 5)"
    )
    parser.add_argument(
        "--mode",
        choices=["spans", "packed", "both"],
        default="both",
        help="token wire mode(s) to measure (default both)",
    )
    parser.add_argument(
        "--inflight",
        type=int,
        default=16,
        help="exports in flight, as from that many exporting processes (default 16)",
    )
    parser.add_argument(
        "--requests-per-export", type=int, default=8, help="LLM requests per export (default 8)"
    )
    parser.add_argument(
        "--tokens", type=int, default=256, help="output tokens per LLM request (default 256)"
    )
    parser.add_argument(
        "--insert-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="the collector's --insert-interval (default 1.0, its own default)",
    )
    parser.add_argument(
        "--insert-block-bytes",
        default="16M",
        metavar="SIZE",
        help="the collector's --insert-block-bytes (default 16M, its own default)",
    )
    add_common_args(parser)
    parser.add_argument("--sender", metavar="HOST:PORT", help=argparse.SUPPRESS)
    parser.add_argument("--packed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parse-only-server", metavar="PORT_FILE", help=argparse.SUPPRESS)
    parser.add_argument("--raw-insert", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--disk-bytes", metavar="DATA_DIR", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.parse_only_server:
        _parse_only_server(args.parse_only_server)
        return 0
    if args.disk_bytes:
        _print_disk_bytes(args.disk_bytes)
        return 0
    if args.raw_insert:
        raw = _raw_insert(args.seconds, args.packed, args.requests_per_export, args.tokens)
        print(json.dumps(raw))
        return 0
    if args.sender:
        result = _sender(
            args.sender,
            args.seconds,
            args.inflight,
            args.packed,
            args.requests_per_export,
            args.tokens,
        )
        print(json.dumps(result))
        return 0
    emit("Collector ingest (python -m bench.ingest)", run(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
