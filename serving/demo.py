"""``tokentrace demo``: the whole loop on one machine, read back from ClickHouse."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tokentrace.serving.stack import LocalStack

# Exact percentiles with linear interpolation, like numpy.percentile in vLLM's benchmark.
_Q = "quantilesExactInclusive(0.5, 0.9, 0.99)"

REPORTS: list[tuple[str, str, list[tuple[str, str]]]] = [
    (
        "TTFT per router node (client-visible: first content chunk written − arrival)",
        f"""SELECT router_node AS node, count() AS requests,
               {_Q}(ttft_s) AS q, avg(e2e_s) AS e2e
            FROM tokentrace.requests WHERE ts >= {{since}} GROUP BY node ORDER BY node""",
        [
            ("node", "node"),
            ("requests", "requests"),
            ("p50 ms", "q0"),
            ("p90 ms", "q1"),
            ("p99 ms", "q2"),
            ("mean e2e ms", "e2e"),
        ],
    ),
    (
        "Prefill time per prefill node (arrival → KV ready)",
        f"""SELECT prefill_node AS node, count() AS requests, {_Q}(prefill_s) AS q
            FROM tokentrace.requests WHERE ts >= {{since}} AND prefill_node IS NOT NULL
            GROUP BY node ORDER BY node""",
        [
            ("node", "node"),
            ("requests", "requests"),
            ("p50 ms", "q0"),
            ("p90 ms", "q1"),
            ("p99 ms", "q2"),
        ],
    ),
    (
        "KV transfer per source → destination (NIXL, initiator clock)",
        f"""SELECT src_node, dst_node, count() AS transfers, avg(bytes) AS avg_bytes,
               {_Q}(duration_s) AS q, sum(bytes) / sum(duration_s) / 1e6 AS mb_s
            FROM tokentrace.kv_transfers WHERE ts >= {{since}}
            GROUP BY src_node, dst_node ORDER BY src_node, dst_node""",
        [
            ("source", "src_node"),
            ("destination", "dst_node"),
            ("transfers", "transfers"),
            ("avg KiB", "avg_kib"),
            ("p50 ms", "q0"),
            ("p99 ms", "q2"),
            ("MB/s", "mb_s"),
        ],
    ),
    (
        "Prefill done → decode receives it (p50/p99) and → first KV read (p50), "
        "on the router's clock; skew = decode clock − prefill clock, measured and removed",
        f"""SELECT prefill_node, decode_node,
               {_Q}(prefill_to_decode_s) AS q, {_Q}(kv_handoff_s) AS h,
               avg(decode_clock_offset_s - prefill_clock_offset_s) AS skew_s
            FROM tokentrace.requests WHERE ts >= {{since}} AND prefill_to_decode_s IS NOT NULL
            GROUP BY prefill_node, decode_node ORDER BY prefill_node, decode_node""",
        [
            ("prefill", "prefill_node"),
            ("decode", "decode_node"),
            ("p50 ms", "q0"),
            ("p99 ms", "q2"),
            ("KV read p50 ms", "h0"),
            ("skew ms", "skew_ms"),
        ],
    ),
    (
        "Inter-token latency per decode node (gap between emissions)",
        f"""SELECT node, count() AS gaps, {_Q}(itl_s) AS q, avg(batch_size) AS batch
            FROM tokentrace.token_latencies WHERE ts >= {{since}} AND itl_s IS NOT NULL
            GROUP BY node ORDER BY node""",
        [
            ("node", "node"),
            ("gaps", "gaps"),
            ("p50 ms", "q0"),
            ("p90 ms", "q1"),
            ("p99 ms", "q2"),
            ("mean batch", "batch"),
        ],
    ),
]


def _since_sql(epoch_s: float) -> str:
    return f"fromUnixTimestamp64Milli({int(epoch_s * 1000)})"


def _cell(key: str, row: dict[str, Any]) -> str:
    if key[:1] in ("q", "h") and key[1:].isdigit():
        return f"{row[key[0]][int(key[1:])] * 1000:.2f}"
    if key == "avg_kib":
        return f"{row['avg_bytes'] / 1024:.0f}"
    if key == "skew_ms":
        skew = row["skew_s"]
        return "—" if skew is None else f"{skew * 1000:+.2f}"
    value = row[key]
    if key == "e2e":
        return f"{value * 1000:.1f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def print_report(stack: LocalStack, since_epoch_s: float, console: Console) -> None:
    """Per-node tables, each one SQL query against ClickHouse through the collector."""
    since = _since_sql(since_epoch_s)
    for title, sql, columns in REPORTS:
        rows = stack.query(sql.format(since=since))
        table = Table(title=title, title_justify="left")
        for header, _ in columns:
            table.add_column(
                header,
                justify="left"
                if header in ("node", "source", "destination", "prefill", "decode")
                else "right",
            )
        for row in rows:
            table.add_row(*[_cell(key, row) for _, key in columns])
        if not rows:
            table.add_row(*(["—"] * len(columns)))
        console.print(table)


def run_from_args(args: argparse.Namespace, data_dir: Path) -> int:
    from tokentrace.serving.load import print_summary, run_load

    console = Console()
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, value in (
        ("--requests", args.requests),
        ("--concurrency", args.concurrency),
        ("--input-len", args.input_len),
        ("--output-len", args.output_len),
    ):
        if value < 1:
            console.print(f"[red]{name} must be at least 1, got {value}[/red]")
            return 2
    engine = getattr(args, "engine", "reference")
    decode_workers = args.decode_workers or (1 if engine == "vllm" else 2)
    stack = LocalStack(data_dir, args.prefill_workers, decode_workers, engine=engine)
    kind = "vLLM servers" if engine == "vllm" else "workers"
    console.print(
        f"[bold]tokentrace demo[/bold]: collector + router + {args.prefill_workers} prefill + "
        f"{decode_workers} decode {kind}, data in {data_dir} (logs in {stack.logs})"
    )
    t0 = time.monotonic()
    failed = 0
    try:
        slow = " — vLLM servers take a minute or two" if engine == "vllm" else ""
        with console.status(f"starting the stack (the first start generates the model{slow})…"):
            stack.start(on_ready=lambda name: console.print(f"  [green]✓[/green] {name} ready"))
        console.print(f"stack up in {time.monotonic() - t0:.1f}s; router at {stack.router_url}")
        console.print(
            f"sending {args.requests} streaming requests ({args.input_len} prompt "
            f"{'characters' if engine == 'vllm' else 'tokens'}, "
            f"{args.output_len} output tokens, {args.concurrency} in flight)…"
        )
        since = time.time() - 1.0
        result = asyncio.run(
            run_load(
                stack.router_url,
                args.requests,
                args.concurrency,
                args.input_len,
                args.output_len,
                progress=True,
            )
        )
        print_summary(result)
        ok = [r for r in result.records if r.success]
        failed = len(result.records) - len(ok)
        with console.status("waiting for every span to land in ClickHouse…"):
            # Every process exports on its own schedule: wait until each request's row
            # has the router's, the prefill node's and the decode node's parts.
            stack.wait_for_rows(
                f"SELECT count() FROM tokentrace.requests WHERE ts >= {_since_sql(since)} "
                "AND prefill_s IS NOT NULL AND kv_transfer_s IS NOT NULL "
                "AND decode_node IS NOT NULL",
                len(ok),
            )
            stack.wait_for_rows(
                f"SELECT sum(tokens) FROM tokentrace.token_latencies "
                f"WHERE ts >= {_since_sql(since)}",
                sum(r.output_tokens or 0 for r in ok),
            )
        console.print()
        console.rule("[bold]Read back from ClickHouse (database tokentrace)")
        print_report(stack, since, console)
        _print_next_steps(console, stack, data_dir, args.keep_running)
        if args.keep_running:
            _serve_until_interrupted(console, stack)
    finally:
        with console.status("stopping the stack…"):
            stack.stop()
    console.print(f"done in {time.monotonic() - t0:.1f}s")
    return 0 if failed == 0 else 1


def _print_next_steps(console: Console, stack: LocalStack, data_dir: Path, live: bool) -> None:
    dd = "" if data_dir == _default() else f" --data-dir {data_dir}"
    command = _command_name()
    console.print()
    console.print("[bold]Query further[/bold] (works with or without a running collector):")
    for sql in (
        "SELECT node, quantileExact(0.99)(itl_s) AS p99_itl_s FROM tokentrace.token_latencies "
        "WHERE ts > now() - INTERVAL 1 HOUR GROUP BY node",
        "SELECT request_id, decode_node, ttft_s, e2e_s, kv_bytes FROM tokentrace.requests "
        "ORDER BY ttft_s DESC LIMIT 5",
        "SELECT SpanName, count() FROM tokentrace.otel_traces GROUP BY SpanName",
    ):
        console.print(f'  {command} query{dd} "{sql}"', soft_wrap=True, highlight=False)
    if live:
        console.print(f'  or POST {{"sql": ...}} to {stack.collector_http}/query')


def _command_name() -> str:
    """How the user can run tokentrace again: ``tokentrace`` if that is on PATH and is
    this one, else the path this process was started as (e.g. ``.venv/bin/tokentrace``)."""
    argv0 = sys.argv[0]
    found = shutil.which("tokentrace")
    if found and Path(found).resolve() == Path(argv0).resolve():
        return "tokentrace"
    if Path(argv0).name == "tokentrace":
        return argv0
    return f"{sys.executable} -m tokentrace"


def _default() -> Path:
    from tokentrace.schemas.layout import default_data_dir

    return default_data_dir()


def _serve_until_interrupted(console: Console, stack: LocalStack) -> None:
    console.print()
    console.print("[bold]The stack keeps running[/bold] (Ctrl-C to stop):")
    console.print(f"  router (OpenAI API):   {stack.router_url}/v1/completions")
    console.print(f"  collector OTLP/gRPC:   {stack.otlp_grpc}")
    console.print(f"  collector OTLP/HTTP:   http://{stack.otlp_http}/v1/traces")
    console.print(f"  collector query API:   {stack.collector_http}/query")
    for name, url in {**stack.prefill, **stack.decode}.items():
        console.print(f"  {name + ':':<22} {url}")
    stopped = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stopped and all(c.alive() for c in stack.components):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
