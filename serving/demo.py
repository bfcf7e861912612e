"""``tokentrace demo``: the whole loop on one machine, read back from ClickHouse.

``--mode disaggregated`` (the default) runs prefill and decode workers behind the P/D
router; ``--mode aggregated`` the same number of workers each doing both; ``--mode
both`` starts the two deployments side by side (one collector, one store), runs the
same seeded workload against each in turn, and prints one comparison table
(docs/aggregated-vs-disaggregated.md explains how to read it).
"""

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

from tokentrace.collector.query.reports import PERCENTILES as _Q
from tokentrace.collector.query.reports import REPORTS, Report, report_table, window_params
from tokentrace.serving.stack import LocalStack

# The comparison of --mode both: per deployment (router node), over one run's requests.
# A deployment's token rows are those of its requests' traces; the ITL tail is the gaps
# above the deployment's own p90.
COMPARE_REQUESTS_SQL = f"""
SELECT router_node, count() AS requests, countIf(status = 'ok') AS ok,
    {_Q}(ttft_s) AS ttft, {_Q}(e2e_s) AS e2e, sum(output_tokens) AS output_tokens,
    (max(toUnixTimestamp64Nano(ts) + e2e_s * 1e9) - min(toUnixTimestamp64Nano(ts))) / 1e9
        AS wall_s
FROM tokentrace.requests
WHERE ts >= {{since}} AND router_node IN {{routers}}
GROUP BY router_node
"""

COMPARE_TOKENS_SQL = f"""
WITH gaps AS (
    SELECT r.router_node AS router_node, t.itl_s AS itl_s,
        t.step_prefill_tokens AS prefill_tokens, t.batch_size AS batch_size
    FROM tokentrace.token_latencies AS t
    INNER JOIN (
        SELECT trace_id, router_node FROM tokentrace.requests
        WHERE ts >= {{since}} AND router_node IN {{routers}}
    ) AS r ON t.trace_id = r.trace_id
    WHERE t.ts >= {{since}} AND t.itl_s IS NOT NULL
)
SELECT router_node, count() AS gaps, any(p.itl) AS itl, avg(batch_size) AS batch,
    countIf(prefill_tokens > 0) AS on_prefill,
    avgIf(itl_s, prefill_tokens > 0) AS itl_prefill_mean,
    avgIf(itl_s, prefill_tokens = 0) AS itl_decode_mean,
    countIf(itl_s > p.itl[2]) AS tail,
    countIf(itl_s > p.itl[2] AND prefill_tokens > 0) AS tail_on_prefill
FROM gaps
INNER JOIN (SELECT router_node, {_Q}(itl_s) AS itl FROM gaps GROUP BY router_node) AS p
    USING router_node
GROUP BY router_node
"""


def comparison(stack: LocalStack, since_epoch_s: float) -> dict[str, dict[str, Any]]:
    """Deployment -> its numbers (seconds, counts), read from ClickHouse: the two
    queries above, merged per router node."""
    nodes = stack.router_nodes
    routers = "(" + ", ".join(f"'{n}'" for n in nodes.values()) + ")"
    fmt = {"since": _since_sql(since_epoch_s), "routers": routers}
    by_node: dict[str, dict[str, Any]] = {n: {} for n in nodes.values()}
    for sql in (COMPARE_REQUESTS_SQL, COMPARE_TOKENS_SQL):
        for row in stack.query(sql.format(**fmt)):
            by_node[row["router_node"]].update(row)
    return {deployment: by_node[node] for deployment, node in nodes.items()}


def comparison_rows(numbers: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, formatted value) for one deployment, in the table's order."""

    def ms(key: str, i: int) -> str:
        values = numbers.get(key)
        return "—" if not values else f"{values[i] * 1000:.2f}"

    def mean(key: str) -> str:
        value = numbers.get(key)
        # avgIf over no rows is nan in ClickHouse (null through JSON): no such step.
        return "—" if value is None or value != value else f"{value * 1000:.2f}"

    def share(part: str, whole: str) -> str:
        n, d = numbers.get(part), numbers.get(whole)
        return "—" if not d else f"{100 * (n or 0) / d:.0f}% ({n}/{d})"

    wall_s, tokens = numbers.get("wall_s"), numbers.get("output_tokens")
    rows = [("requests (ok)", f"{numbers.get('requests', 0)} ({numbers.get('ok', 0)})")]
    for label, key in (("TTFT", "ttft"), ("ITL", "itl"), ("E2E", "e2e")):
        for i, q in enumerate(("p50", "p90", "p99")):
            rows.append((f"{label} {q} ms", ms(key, i)))
    rows += [
        ("output throughput tok/s", "—" if not wall_s else f"{(tokens or 0) / wall_s:.1f}"),
        ("mean batch size", "—" if numbers.get("batch") is None else f"{numbers['batch']:.2f}"),
        ("ITL gaps on steps with prefill", share("on_prefill", "gaps")),
        (
            "ITL mean ms, steps with / without prefill",
            f"{mean('itl_prefill_mean')} / {mean('itl_decode_mean')}",
        ),
        ("ITL tail (> p90) on steps with prefill", share("tail_on_prefill", "tail")),
    ]
    return rows


def print_comparison(stack: LocalStack, since_epoch_s: float, console: Console) -> None:
    """One side-by-side table of the deployments of ``stack``, from ClickHouse."""
    numbers = comparison(stack, since_epoch_s)
    table = Table(
        title="Aggregated vs disaggregated: the same workload "
        "(router-side TTFT and E2E, decode-node ITL)",
        title_justify="left",
    )
    table.add_column("metric", justify="left")
    columns = {}
    for deployment, values in numbers.items():
        workers = stack.both if deployment == "aggregated" else {**stack.prefill, **stack.decode}
        table.add_column(f"{deployment}\n{', '.join(workers)}", justify="right")
        columns[deployment] = comparison_rows(values)
    first = next(iter(columns.values()))
    for i, (metric, _) in enumerate(first):
        table.add_row(metric, *[rows[i][1] for rows in columns.values()])
    console.print(table)


def _since_sql(epoch_s: float) -> str:
    return f"fromUnixTimestamp64Milli({int(epoch_s * 1000)})"


def print_report(
    stack: LocalStack, window_ms: tuple[int, int], console: Console
) -> list[tuple[Report, list[dict[str, Any]]]]:
    """The named reports (:mod:`tokentrace.collector.query.reports`) over ``window_ms`` (from,
    to), each one query through the collector, as tables; returns their rows."""
    params = window_params(*window_ms)
    out = []
    for rep in REPORTS:
        rows = stack.query(rep.sql_for(), params=params)
        console.print(report_table(rep, rows))
        out.append((rep, rows))
    return out


MODES = ("disaggregated", "aggregated", "both")
# --mode both paces the workload (seeded Poisson arrivals) unless --request-rate says
# otherwise: a closed loop would let each deployment's speed change its own arrivals.
# At 10/s the two workers of either deployment overlap requests on this small CPU
# model, so steps with prefill work happen; the concurrency cap only guards.
BOTH_DEFAULT_REQUEST_RATE = 10.0
BOTH_DEFAULT_CONCURRENCY = 16
DEFAULT_CONCURRENCY = 4


def run_from_args(args: argparse.Namespace, data_dir: Path) -> int:
    from tokentrace.serving.load import LoadResult, print_summary, run_load

    console = Console()
    data_dir.mkdir(parents=True, exist_ok=True)
    mode = getattr(args, "mode", "disaggregated")
    rate = getattr(args, "request_rate", None)
    concurrency = args.concurrency or (
        BOTH_DEFAULT_CONCURRENCY if mode == "both" else DEFAULT_CONCURRENCY
    )
    for name, value in (
        ("--requests", args.requests),
        ("--concurrency", concurrency),
        ("--input-len", args.input_len),
        ("--output-len", args.output_len),
        ("--prefill-workers", args.prefill_workers),
    ):
        if value < 1:
            console.print(f"[red]{name} must be at least 1, got {value}[/red]")
            return 2
    if rate is not None and not rate > 0:
        console.print(f"[red]--request-rate must be positive, got {rate}[/red]")
        return 2
    engine = getattr(args, "engine", "reference")
    if engine == "vllm" and mode != "disaggregated":
        console.print(f"[red]--mode {mode} needs --engine reference (both-workers)[/red]")
        return 2
    default_decode = 1 if engine == "vllm" or mode == "both" else 2
    decode_workers = args.decode_workers or default_decode
    if mode == "both" and rate is None:
        rate = BOTH_DEFAULT_REQUEST_RATE
    # The aggregated deployment gets as many workers as the disaggregated one has.
    workers = args.prefill_workers + decode_workers
    disaggregated = mode != "aggregated"
    stack = LocalStack(
        data_dir,
        args.prefill_workers if disaggregated else 0,
        decode_workers if disaggregated else 0,
        both_workers=workers if mode != "disaggregated" else 0,
        engine=engine,
    )
    kind = "vLLM servers" if engine == "vllm" else "workers"
    parts = []
    if disaggregated:
        parts.append(f"{args.prefill_workers} prefill + {decode_workers} decode {kind}")
    if mode != "disaggregated":
        parts.append(f"{workers} both-workers (aggregated)")
    routers = "routers" if mode == "both" else "router"
    console.print(
        f"[bold]tokentrace demo[/bold] ({mode}): collector + {routers} + {' and '.join(parts)}, "
        f"data in {data_dir} (logs in {stack.logs})"
    )
    t0 = time.monotonic()
    failed = 0
    try:
        slow = " — vLLM servers take a minute or two" if engine == "vllm" else ""
        with console.status(f"starting the stack (the first start generates the model{slow})…"):
            stack.start(on_ready=lambda name: console.print(f"  [green]✓[/green] {name} ready"))
        where = ", ".join(f"{d} router at {u}" for d, u in stack.router_urls.items())
        console.print(f"stack up in {time.monotonic() - t0:.1f}s; {where}")
        pacing = f"{rate:g}/s seeded Poisson arrivals, at most " if rate else ""
        console.print(
            f"sending {args.requests} streaming requests ({args.input_len} prompt "
            f"{'characters' if engine == 'vllm' else 'tokens'}, "
            f"{args.output_len} output tokens, {pacing}{concurrency} in flight)"
            f"{' to each deployment' if mode == 'both' else ''}…"
        )
        since = time.time() - 1.0
        results: dict[str, LoadResult] = {}
        for deployment, url in stack.router_urls.items():
            if mode == "both":
                console.print(f"[bold]{deployment}[/bold] ({url})")
            results[deployment] = asyncio.run(
                run_load(
                    url,
                    args.requests,
                    concurrency,
                    args.input_len,
                    args.output_len,
                    progress=True,
                    request_rate=rate,
                )
            )
            if mode != "both":
                print_summary(results[deployment])
        ok = {d: [r for r in res.records if r.success] for d, res in results.items()}
        failed = sum(len(res.records) - len(ok[d]) for d, res in results.items())
        with console.status("waiting for every span to land in ClickHouse…"):
            # Every process exports on its own schedule: wait until each request's row
            # has the router's, the prefill node's and the decode node's parts.
            for deployment, node in stack.router_nodes.items():
                kv = " AND kv_transfer_s IS NOT NULL" if deployment == "disaggregated" else ""
                stack.wait_for_rows(
                    f"SELECT count() FROM tokentrace.requests WHERE ts >= {_since_sql(since)} "
                    f"AND router_node = '{node}' AND prefill_s IS NOT NULL{kv} "
                    "AND decode_node IS NOT NULL",
                    len(ok[deployment]),
                )
            stack.wait_for_rows(
                f"SELECT sum(tokens) FROM tokentrace.token_latencies "
                f"WHERE ts >= {_since_sql(since)}",
                sum(r.output_tokens or 0 for records in ok.values() for r in records),
            )
        console.print()
        console.rule("[bold]Read back from ClickHouse (database tokentrace)")
        if mode == "both":
            print_comparison(stack, since, console)
            if failed:
                console.print(f"[red]{failed} requests failed[/red]")
        else:
            print_report(stack, (int(since * 1000), time.time_ns() // 1_000_000 + 1), console)
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
    console.print(
        f"  {command} report{dd} --since 1h   # these tables again, any window", highlight=False
    )
    for sql in (
        "SELECT node, quantileExactInclusive(0.99)(itl_s) AS p99_itl_s "
        "FROM tokentrace.token_latencies WHERE ts > now() - INTERVAL 1 HOUR GROUP BY node",
        "SELECT request_id, decode_node, ttft_s, e2e_s, kv_bytes FROM tokentrace.requests "
        "ORDER BY ttft_s DESC LIMIT 5",
        "SELECT SpanName, count() FROM tokentrace.otel_traces GROUP BY SpanName",
    ):
        console.print(f'  {command} query{dd} "{sql}"', soft_wrap=True, highlight=False)
    if live:
        console.print(f'  or POST {{"sql": ...}} to {stack.collector_http}/query')
        console.print(
            f"[bold]See it[/bold]: the latency page is at {stack.collector_http}/ui/",
            soft_wrap=True,
            highlight=False,
        )
    else:
        console.print(
            f"[bold]See it[/bold]: {command} ui{dd} serves the latency page from this "
            "store (or rerun the demo with --keep-running)",
            soft_wrap=True,
            highlight=False,
        )


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
    from tokentrace.runtime.layout import default_data_dir

    return default_data_dir()


def _serve_until_interrupted(console: Console, stack: LocalStack) -> None:
    console.print()
    console.print("[bold]The stack keeps running[/bold] (Ctrl-C to stop):")
    for deployment, url in stack.router_urls.items():
        console.print(f"  {deployment + ' router:':<22} {url}/v1/completions")
    console.print(f"  collector OTLP/gRPC:   {stack.otlp_grpc}")
    console.print(f"  collector OTLP/HTTP:   http://{stack.otlp_http}/v1/traces")
    console.print(f"  collector query API:   {stack.collector_http}/query")
    for name, url in {**stack.prefill, **stack.decode, **stack.both}.items():
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
