"""Query latency at scale: 10 million tokens in the embedded ClickHouse, stored as the
collector stores packed emissions (per request: four spans in ``otel_spans`` and one
``token_emissions`` row of 256 emissions), queried through a running collector's HTTP
API the way users query it, through the views that expand the emissions on read.

- Trace lookup by id (260 spans: the stored four and 256 token spans the ``otel_traces``
  view expands): ``GET /api/traces/{id}`` (Jaeger v1), and the Grafana ClickHouse
  plugin's trace SQL. Baseline, same data: the stored spans read by trace id alone.
- Per-node p50/p99 ITL over the last hour from the per-minute sketch (``itl_by_minute``,
  what the dashboard's ITL panel reads). Baseline: the exact figures from
  ``token_latencies`` (every gap expanded and sorted).
- The ``tokentrace demo`` summary tables (every report query, in sequence). Baseline:
  one full scan of ``token_latencies`` (``count()`` of the ITL column), the floor for
  any query that reads every row.
- Bytes per token on disk: ``token_emissions`` compressed, over the tokens it holds.

Each latency is the median of ``--repeats`` runs after a warm-up run, measured by the
client (the HTTP round trip included).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import Progress

from bench._common import Figure, add_common_args, collector_argv, emit, median
from tokentrace.schemas import attributes as A

NODES = 8  # decode nodes
TOKENS = 256  # output tokens per request, packed onto its llm.decode span
STORED_SPANS = 4  # per trace: llm.request, llm.prefill, llm.decode, llm.kv_transfer
SPANS_PER_TRACE = STORED_SPANS + TOKENS  # as the otel_traces view reads a trace

# The Grafana ClickHouse plugin's trace-by-id query (v4, OpenTelemetry mode, traces table
# otel_traces): the window from the trace-id table, then the spans in it.
GRAFANA_TRACE_SQL = """
WITH '{trace_id}' AS trace_id,
    (SELECT min(Start) FROM tokentrace.otel_traces_trace_id_ts WHERE TraceId = trace_id)
        AS trace_start,
    (SELECT max(End) + 1 FROM tokentrace.otel_traces_trace_id_ts WHERE TraceId = trace_id)
        AS trace_end
SELECT
    TraceId AS traceID, SpanId AS spanID, ParentSpanId AS parentSpanID,
    ServiceName AS serviceName, SpanName AS operationName,
    Timestamp AS startTime, multiply(Duration, 0.000001) AS duration,
    arrayMap(key -> map('key', key, 'value', SpanAttributes[key]), mapKeys(SpanAttributes))
        AS tags,
    arrayMap(key -> map('key', key, 'value', ResourceAttributes[key]),
        mapKeys(ResourceAttributes)) AS serviceTags,
    arrayMap((name, timestamp, attributes) -> tuple(name, toString(
        toUnixTimestamp64Milli(timestamp)), arrayMap(key -> map('key', key, 'value',
        attributes[key]), mapKeys(attributes))), Events.Name, Events.Timestamp,
        Events.Attributes) AS logs,
    SpanKind AS kind, StatusCode AS statusCode, StatusMessage AS statusMessage
FROM tokentrace.otel_traces
WHERE traceID = trace_id AND startTime >= trace_start AND startTime <= trace_end
ORDER BY startTime
LIMIT 1000
"""


def trace_id_sql(number: str) -> str:
    """The id of synthetic trace ``number`` (a SQL expression)."""
    return f"lower(hex(MD5(toString({number}))))"


def _load(data_dir: Path, token_rows: int, progress: Progress) -> int:
    """Fill a fresh store with synthetic but realistic rows, generated inside ClickHouse:
    ``token_rows // TOKENS`` requests over the last hour, each its four stored spans and
    its emissions packed as the collector stores them (one ``token_emissions`` row).
    Returns the bytes ``token_emissions`` takes on disk, compressed."""
    from tokentrace.collector.store import open_store

    traces = token_rows // TOKENS
    store = open_store(f"chdb://{data_dir / 'clickhouse'}")
    now_ns = time.time_ns()
    hour = 3600 * 10**9
    start = f"toInt64({now_ns} - {hour} + intDiv(t * {hour}, {traces}))"
    node = f"concat('decode-', toString(t % {NODES}))"
    task = progress.add_task("loading", total=5)
    try:
        store.command(f"""
            INSERT INTO tokentrace.otel_spans
                (Timestamp, TraceId, SpanId, ParentSpanId, SpanName, SpanKind, ServiceName,
                 ResourceAttributes, ScopeName, SpanAttributes, Duration, StatusCode)
            SELECT
                fromUnixTimestamp64Nano({start} + k * 3000000) AS Timestamp,
                {trace_id_sql("t")} AS TraceId,
                lower(hex(sipHash64(t, k))) AS SpanId,
                if(k = 0, '', lower(hex(sipHash64(t, if(k = 3, 2, 0))))) AS ParentSpanId,
                ['{A.SPAN_REQUEST}', '{A.SPAN_PREFILL}', '{A.SPAN_DECODE}',
                 '{A.SPAN_KV_TRANSFER}'][k + 1] AS SpanName,
                if(k = 3, 'Client', 'Server') AS SpanKind,
                ['tokentrace-router', 'tokentrace-prefill', 'tokentrace-decode',
                 'tokentrace-decode'][k + 1] AS ServiceName,
                map('service.name', ServiceName, 'host.name', 'host',
                    '{A.NODE_ID}', multiIf(k = 0, 'router-0', k = 1, 'prefill-0', {node}),
                    'telemetry.sdk.language', 'python') AS ResourceAttributes,
                'tokentrace' AS ScopeName,
                map('{A.REQUEST_ID}', concat('cmpl-', toString(t)),
                    '{A.GEN_AI_REQUEST_MODEL}', 'tt-tiny') AS SpanAttributes,
                toUInt64(if(k = 2, 1300000000, 2000000 + sipHash64(t, k) % 6000000)) AS Duration,
                'Unset' AS StatusCode
            FROM (SELECT number AS t FROM numbers({traces}))
            ARRAY JOIN [0, 1, 2, 3] AS k
        """)
        progress.advance(task)
        # Gaps of 2-8 ms, as the ingest benchmark's decode node sends them.
        store.command(f"""
            INSERT INTO tokentrace.token_emissions
            SELECT
                fromUnixTimestamp64Nano({start} + 6000000) AS decode_start,
                {trace_id_sql("t")} AS trace_id,
                lower(hex(sipHash64(t, 2))) AS decode_span_id,
                'tokentrace-decode' AS service_name,
                map('service.name', 'tokentrace-decode', 'host.name', 'host',
                    '{A.NODE_ID}', {node}, 'telemetry.sdk.language', 'python')
                    AS resource_attributes,
                'tokentrace' AS scope_name,
                '' AS scope_version,
                {node} AS node,
                arrayCumSum(arrayMap(i -> if(i = 0, 5000000,
                    toInt64(2000000 + sipHash64(t, i) % 6000000)), range({TOKENS + 1}))) AS times,
                arrayMap(i -> toInt64(1000 + t + i), range({TOKENS})) AS steps,
                arrayWithConstant({TOKENS}, toUInt16(1)) AS counts,
                arrayWithConstant({TOKENS}, toUInt16(16)) AS batch_sizes,
                arrayWithConstant({TOKENS}, toNullable(toUInt32(0))) AS prefill_tokens
            FROM (SELECT number AS t FROM numbers({traces}))
        """)
        progress.advance(task)
        store.command(f"""
            INSERT INTO tokentrace.request_parts
                (trace_id, ts, request_id, model, router_node, prefill_node, decode_node,
                 input_tokens, output_tokens, ttft_s, e2e_s, tpot_s, prefill_s, kv_transfer_s,
                 kv_bytes, status)
            SELECT
                {trace_id_sql("t")}, fromUnixTimestamp64Nano({start}),
                concat('cmpl-', toString(t)), 'tt-tiny', 'router-0', 'prefill-0',
                {node}, 256, {TOKENS},
                (30000000 + sipHash64(t) % 90000000) / 1e9, 1.2, 0.0045,
                (20000000 + sipHash64(t, 1) % 40000000) / 1e9, 0.004, 1048576, 'ok'
            FROM (SELECT number AS t FROM numbers({traces}))
        """)
        progress.advance(task)
        store.command(f"""
            INSERT INTO tokentrace.kv_transfers
            SELECT
                fromUnixTimestamp64Nano({start} + 9000000), {trace_id_sql("t")}, 'prefill-0',
                {node}, (1000000 + sipHash64(t) % 9000000) / 1e9, 1048576, 16, 'nixl/UCX', 'ok'
            FROM (SELECT number AS t FROM numbers({traces}))
        """)
        progress.advance(task)
        for table in ("otel_spans", "token_emissions", "itl_by_minute"):
            store.command(f"OPTIMIZE TABLE tokentrace.{table} FINAL")
        progress.advance(task)
        disk = store.query(
            "SELECT sum(bytes_on_disk) FROM system.parts WHERE active "
            "AND database = 'tokentrace' AND table = 'token_emissions'"
        )
        return int(disk.rows[0][0])
    finally:
        store.close()


def _start_collector(data_dir: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        collector_argv(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("tokentrace collector ready"):
        proc.kill()
        raise RuntimeError(
            f"collector did not start: {line} {proc.stderr.read() if proc.stderr else ''}"
        )
    return proc


def _timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: caches and the first-use work of every layer
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1000)
    return median(times)


def run(args: argparse.Namespace) -> list[Figure]:
    from tokentrace.collector.query.reports import REPORTS

    tmp = Path(tempfile.mkdtemp(prefix="tt-bench-query-"))
    proc: subprocess.Popen[str] | None = None
    try:
        with Progress(console=Console(stderr=True), transient=True) as progress:
            disk_bytes = _load(tmp, args.token_rows, progress)
        proc = _start_collector(tmp)
        api = f"http://{json.loads((tmp / 'collector.json').read_text())['http']}"
        client = httpx.Client(timeout=120)

        def sql(text: str) -> list[list[object]]:
            resp = client.post(f"{api}/query", json={"sql": text})
            resp.raise_for_status()
            return list(resp.json()["rows"])

        count = int(str(sql("SELECT count() FROM token_latencies")[0][0]))
        span_count = int(str(sql("SELECT count() FROM otel_traces")[0][0]))
        rng = random.Random(7)
        traces = args.token_rows // TOKENS
        ids = [
            sql(f"SELECT {trace_id_sql(str(rng.randrange(traces)))}")[0][0]
            for _ in range(args.repeats + 1)
        ]
        lookups = iter(ids * 3)

        def lookup() -> None:
            resp = client.get(f"{api}/api/traces/{next(lookups)}")
            resp.raise_for_status()
            assert len(resp.json()["data"][0]["spans"]) == SPANS_PER_TRACE

        def grafana_lookup() -> None:
            rows = sql(GRAFANA_TRACE_SQL.format(trace_id=next(lookups)))
            assert len(rows) == SPANS_PER_TRACE

        scans = iter(ids * 2)

        def lookup_by_id_only() -> None:
            rows = sql("SELECT * FROM otel_spans WHERE TraceId = '" + str(next(scans)) + "'")
            assert len(rows) == STORED_SPANS

        itl_sql = (
            "SELECT node, quantilesExactInclusive(0.5, 0.99)(itl_s) FROM token_latencies "
            "WHERE ts > now() - INTERVAL 1 HOUR GROUP BY node ORDER BY node"
        )
        itl_sketch_sql = (
            "SELECT node, quantilesDDMerge(0.001, 0.5, 0.99)(itl) FROM itl_by_minute "
            "WHERE minute > now() - INTERVAL 1 HOUR GROUP BY node ORDER BY node"
        )
        now_ms = int(time.time() * 1000)
        window = {"from_ms": now_ms - 3_600_000, "to_ms": now_ms + 60_000}

        def demo_tables() -> None:
            for report in REPORTS:  # GET /reports/{name}: what the demo and the page read
                client.get(f"{api}/reports/{report.name}", params=window).raise_for_status()

        figures = [
            Figure(
                f"trace lookup by id, Jaeger API ({SPANS_PER_TRACE} spans)",
                _timed(lookup, args.repeats),
                "ms",
                _timed(lookup_by_id_only, args.repeats),
                "≤ 50 ms",
                None,
                "stored spans by TraceId",
            ),
            Figure(
                f"trace lookup by id, Grafana's trace SQL ({SPANS_PER_TRACE} spans)",
                _timed(grafana_lookup, args.repeats),
                "ms",
                None,
                "≤ 50 ms",
                None,
            ),
            Figure(
                f"per-node p50/p99 ITL, last hour, sketch ({NODES} nodes)",
                _timed(lambda: sql(itl_sketch_sql), args.repeats),
                "ms",
                _timed(lambda: sql(itl_sql), args.repeats),
                "≤ 200 ms",
                None,
                "exact, token_latencies",
            ),
            Figure(
                f"tokentrace demo summary tables ({len(REPORTS)} queries)",
                _timed(demo_tables, args.repeats),
                "ms",
                _timed(lambda: sql("SELECT count(itl_s) FROM token_latencies"), args.repeats),
                "≤ 500 ms",
                None,
                "one full scan of token rows",
            ),
        ]
        limits = (50.0, 50.0, 200.0, 500.0)
        figures = [
            Figure(f.name, f.value, f.unit, f.baseline, f.target, f.value <= limit, f.baseline_name)
            for f, limit in zip(figures, limits, strict=True)
        ]
        figures.append(
            Figure(
                "token rows read through token_latencies",
                float(count),
                "rows",
                None,
                f"{traces * TOKENS:,}",
                count == traces * TOKENS,
            )
        )
        figures.append(
            Figure(
                "spans read through otel_traces",
                float(span_count),
                "spans",
                None,
                f"{traces * SPANS_PER_TRACE:,}",
                span_count == traces * SPANS_PER_TRACE,
            )
        )
        bytes_per_token = disk_bytes / max(count, 1)
        figures.append(
            Figure(
                "token_emissions on disk per token (parts, compressed)",
                bytes_per_token,
                "bytes",
                None,
                "≤ 8 bytes",
                bytes_per_token <= 8,
            )
        )
        return figures
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.query",
        description="Query latency through the collector's HTTP API with 10 million tokens "
        f"loaded ({TOKENS} per request, packed, as the collector stores them: 4 stored spans "
        "and one token_emissions row per request); each figure next to a same-data "
        "baseline query.",
    )
    parser.add_argument(
        "--token-rows",
        type=int,
        default=10_000_000,
        help=f"tokens to load, {TOKENS} per request (default 10,000,000)",
    )
    parser.add_argument(
        "--repeats", type=int, default=9, help="timed runs per query after one warm-up (default 9)"
    )
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    emit("Query latency (python -m bench.query)", run(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
