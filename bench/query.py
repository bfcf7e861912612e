"""Query latency at scale: 10 million token rows and 2 million spans in the embedded
ClickHouse, queried through a running collector's HTTP API the way users query it.

- Trace lookup by id: ``GET /api/traces/{id}`` (Jaeger v1), which finds the trace's time
  window in the trace-id → time table and reads only that window. Baseline, same data:
  the same spans read by trace id alone (``WHERE TraceId = ...``, bloom filter index).
- Per-node p50/p99 ITL over the last hour from ``token_latencies``. Baseline: the same
  figures computed from the raw ``llm.token`` spans in ``otel_traces``.
- The ``tokentrace demo`` summary tables (every report query, in sequence). Baseline:
  one full scan of ``token_latencies`` (``count()`` of the ITL column), the floor for
  any query that reads every row.

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
SPANS_PER_TRACE = 50  # request, prefill, decode, kv transfer and 46 token spans


def _load(data_dir: Path, token_rows: int, spans: int, progress: Progress) -> None:
    """Fill a fresh store with synthetic but realistic rows, generated inside ClickHouse."""
    from tokentrace.collector.store import open_store

    traces = spans // SPANS_PER_TRACE
    store = open_store(f"chdb://{data_dir / 'clickhouse'}")
    now_ns = time.time_ns()
    hour = 3600 * 10**9
    task = progress.add_task("loading", total=4)
    try:
        # Traces spread over the last two hours; ids are deterministic hashes.
        store.command(f"""
            INSERT INTO tokentrace.otel_traces
                (Timestamp, TraceId, SpanId, ParentSpanId, SpanName, SpanKind, ServiceName,
                 ResourceAttributes, ScopeName, SpanAttributes, Duration, StatusCode)
            SELECT
                fromUnixTimestamp64Nano(toInt64({now_ns} - 2 * {hour}
                    + intDiv(number, {SPANS_PER_TRACE}) * intDiv(2 * {hour}, {traces})
                    + (number % {SPANS_PER_TRACE}) * 3000000)) AS Timestamp,
                lower(hex(MD5(toString(intDiv(number, {SPANS_PER_TRACE}))))) AS TraceId,
                lower(hex(sipHash64(number))) AS SpanId,
                if(number % {SPANS_PER_TRACE} = 0, '',
                   lower(hex(sipHash64(number - number % {SPANS_PER_TRACE})))) AS ParentSpanId,
                multiIf(number % {SPANS_PER_TRACE} = 0, '{A.SPAN_REQUEST}',
                        number % {SPANS_PER_TRACE} = 1, '{A.SPAN_PREFILL}',
                        number % {SPANS_PER_TRACE} = 2, '{A.SPAN_DECODE}',
                        number % {SPANS_PER_TRACE} = 3, '{A.SPAN_KV_TRANSFER}',
                        '{A.SPAN_TOKEN}') AS SpanName,
                if(number % {SPANS_PER_TRACE} >= 4, 'Internal', 'Server') AS SpanKind,
                multiIf(number % {SPANS_PER_TRACE} = 0, 'tokentrace-router',
                        number % {SPANS_PER_TRACE} = 1, 'tokentrace-prefill',
                        'tokentrace-decode') AS ServiceName,
                map('service.name', ServiceName, 'host.name', 'host',
                    '{A.NODE_ID}', multiIf(number % {SPANS_PER_TRACE} = 0, 'router-0',
                        number % {SPANS_PER_TRACE} = 1, 'prefill-0',
                        concat('decode-', toString(intDiv(number, {SPANS_PER_TRACE}) % {NODES}))),
                    '{A.ROLE}', 'decode', 'telemetry.sdk.language', 'python') AS ResourceAttributes,
                'tokentrace' AS ScopeName,
                if(number % {SPANS_PER_TRACE} >= 4,
                   map('{A.TOKEN_INDEX}', toString(number % {SPANS_PER_TRACE} - 4),
                       '{A.TOKEN_COUNT}', '1', '{A.ENGINE_STEP}', toString(number),
                       '{A.BATCH_SIZE}', '16'),
                   map('{A.REQUEST_ID}',
                       concat('cmpl-', toString(intDiv(number, {SPANS_PER_TRACE}))),
                       '{A.GEN_AI_REQUEST_MODEL}', 'tt-tiny')) AS SpanAttributes,
                toUInt64(2000000 + sipHash64(number) % 6000000) AS Duration,
                'Unset' AS StatusCode
            FROM numbers({traces * SPANS_PER_TRACE})
        """)
        progress.advance(task)
        # The token spans above made token rows of their own (token_latencies_mv): the
        # figures want exactly token_rows of them, spread as below.
        store.command("TRUNCATE TABLE tokentrace.token_latencies")
        # Token rows: the last hour, spread over the decode nodes.
        store.command(f"""
            INSERT INTO tokentrace.token_latencies
                (ts, trace_id, node, token_index, itl_s, tokens, batch_size)
            SELECT
                fromUnixTimestamp64Nano(toInt64({now_ns} - {hour}
                    + intDiv(number * {hour}, {token_rows}))) AS ts,
                lower(hex(MD5(toString(intDiv(number, 256))))) AS trace_id,
                concat('decode-', toString(intDiv(number, 256) % {NODES})) AS node,
                number % 256 AS token_index,
                if(number % 256 = 0, NULL, (2000000 + sipHash64(number) % 6000000) / 1e9) AS itl_s,
                1 AS tokens,
                16 AS batch_size
            FROM numbers({token_rows})
        """)
        progress.advance(task)
        requests = token_rows // 256
        store.command(f"""
            INSERT INTO tokentrace.request_parts
                (trace_id, ts, request_id, model, router_node, prefill_node, decode_node,
                 input_tokens, output_tokens, ttft_s, e2e_s, tpot_s, prefill_s, kv_transfer_s,
                 kv_bytes, status)
            SELECT
                lower(hex(MD5(toString(number)))),
                fromUnixTimestamp64Nano(toInt64({now_ns} - {hour}
                    + intDiv(number * {hour}, {requests}))),
                concat('cmpl-', toString(number)), 'tt-tiny', 'router-0', 'prefill-0',
                concat('decode-', toString(number % {NODES})), 256, 256,
                (30000000 + sipHash64(number) % 90000000) / 1e9, 1.2, 0.0045,
                (20000000 + sipHash64(number, 1) % 40000000) / 1e9, 0.004, 1048576, 'ok'
            FROM numbers({requests})
        """)
        store.command(f"""
            INSERT INTO tokentrace.kv_transfers
            SELECT
                fromUnixTimestamp64Nano(toInt64({now_ns} - {hour}
                    + intDiv(number * {hour}, {requests}))),
                lower(hex(MD5(toString(number)))), 'prefill-0',
                concat('decode-', toString(number % {NODES})),
                (1000000 + sipHash64(number) % 9000000) / 1e9, 1048576, 16, 'nixl/UCX', 'ok'
            FROM numbers({requests})
        """)
        progress.advance(task)
        store.command("OPTIMIZE TABLE tokentrace.otel_traces FINAL")
        store.command("OPTIMIZE TABLE tokentrace.token_latencies FINAL")
        progress.advance(task)
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
            _load(tmp, args.token_rows, args.spans, progress)
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
        traces = args.spans // SPANS_PER_TRACE
        ids = [
            sql(f"SELECT lower(hex(MD5(toString({rng.randrange(traces)}))))")[0][0]
            for _ in range(args.repeats + 1)
        ]
        lookups = iter(ids * 2)

        def lookup() -> None:
            resp = client.get(f"{api}/api/traces/{next(lookups)}")
            resp.raise_for_status()
            assert len(resp.json()["data"][0]["spans"]) == SPANS_PER_TRACE

        scans = iter(ids * 2)

        def lookup_by_id_only() -> None:
            rows = sql("SELECT * FROM otel_traces WHERE TraceId = '" + str(next(scans)) + "'")
            assert len(rows) == SPANS_PER_TRACE

        itl_sql = (
            "SELECT node, quantiles(0.5, 0.99)(itl_s) FROM token_latencies "
            "WHERE ts > now() - INTERVAL 1 HOUR GROUP BY node ORDER BY node"
        )
        itl_raw_sql = (
            f"SELECT ResourceAttributes['{A.NODE_ID}'] AS node, "
            "quantiles(0.5, 0.99)(Duration / 1e9) FROM otel_traces "
            f"WHERE SpanName = '{A.SPAN_TOKEN}' AND Timestamp > now() - INTERVAL 1 HOUR "
            f"AND SpanAttributes['{A.TOKEN_INDEX}'] != '0' GROUP BY node ORDER BY node"
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
                "WHERE TraceId = id",
            ),
            Figure(
                f"per-node p50/p99 ITL, last hour ({NODES} nodes)",
                _timed(lambda: sql(itl_sql), args.repeats),
                "ms",
                _timed(lambda: sql(itl_raw_sql), args.repeats),
                "≤ 200 ms",
                None,
                "same from raw spans",
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
        limits = (50.0, 200.0, 500.0)
        figures = [
            Figure(f.name, f.value, f.unit, f.baseline, f.target, f.value <= limit, f.baseline_name)
            for f, limit in zip(figures, limits, strict=True)
        ]
        figures.append(
            Figure(
                "token rows loaded",
                float(count),
                "rows",
                None,
                f"{args.token_rows:,}",
                count == args.token_rows,
            )
        )
        figures.append(
            Figure(
                "spans loaded",
                float(span_count),
                "spans",
                None,
                f"{args.spans:,}",
                span_count >= args.spans - SPANS_PER_TRACE,
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
        description="Query latency through the collector's HTTP API with 10 million token "
        "rows and 2 million spans loaded; each figure next to a same-data baseline query.",
    )
    parser.add_argument(
        "--token-rows",
        type=int,
        default=10_000_000,
        help="token_latencies rows to load (default 10,000,000)",
    )
    parser.add_argument(
        "--spans", type=int, default=2_000_000, help="otel_traces spans to load (default 2,000,000)"
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
