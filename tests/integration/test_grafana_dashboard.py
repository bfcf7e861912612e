"""Every SQL query of deploy/grafana's dashboard, run against a real stack's store.

Grafana is not here, so the test stands in for the ClickHouse plugin: it expands the
plugin's macros the way the plugin's backend does, with concrete values for the
dashboard's time range, interval and variables, and runs the result through the
collector's read-only ``/query`` (the same ClickHouse engine and tables Grafana reads):

- ``$__timeFilter_ms(col)`` → ``col >= fromUnixTimestamp64Milli(FROM) AND
  col <= fromUnixTimestamp64Milli(TO)``, FROM/TO the run's window in ms;
- ``$__timeInterval_ms(col)`` → ``toStartOfInterval(toDateTime64(col, 3), INTERVAL
  1000 millisecond)``;
- ``$__timeFilter(col)`` (a DateTime column) → ``col >= toDateTime(FROM_s) AND
  col <= toDateTime(TO_s)``, FROM/TO the window in whole seconds;
- ``$__timeInterval(col)`` → ``toStartOfInterval(toDateTime(col), INTERVAL 1 second)``;
- ``${decode_node:singlequote}`` → every decode node, quoted and comma-separated;
  ``${decode_node}`` (the repeated heatmap) → each decode node in turn.

A ``$`` left after that is a macro or variable the test does not know: it fails, so a
new one gets a documented expansion here before it lands in the dashboard.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tokentrace.serving.load import run_load
from tokentrace.serving.stack import LocalStack

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/tokentrace.json"
REQUESTS = 8
OUTPUT_LEN = 8
INTERVAL_MS = 1000


@pytest.fixture(scope="module")
def window(stack: LocalStack) -> tuple[int, int]:
    """The load's time window in ms since the epoch, once its rows are stored."""
    from_ms = time.time_ns() // 1_000_000 - 60_000
    result = asyncio.run(run_load(stack.router_url, REQUESTS, 2, 100, OUTPUT_LEN, progress=False))
    assert all(r.success for r in result.records), [r.error for r in result.records]
    stack.wait_for_rows("SELECT count() FROM tokentrace.requests", REQUESTS)
    stack.wait_for_rows("SELECT sum(tokens) FROM tokentrace.token_latencies", REQUESTS * OUTPUT_LEN)
    stack.wait_for_rows("SELECT count() FROM tokentrace.kv_transfers", REQUESTS)
    return from_ms, time.time_ns() // 1_000_000 + 60_000


def expand(sql: str, window: tuple[int, int], decode_nodes: list[str], node: str = "") -> str:
    """``sql`` with the plugin's macros and the dashboard's variables made concrete."""
    from_ms, to_ms = window

    def time_filter(m: re.Match[str]) -> str:
        col = m.group(1)
        return (
            f"{col} >= fromUnixTimestamp64Milli({from_ms}) "
            f"AND {col} <= fromUnixTimestamp64Milli({to_ms})"
        )

    sql = re.sub(r"\$__timeFilter_ms\(\s*(\w+)\s*\)", time_filter, sql)
    sql = re.sub(
        r"\$__timeFilter\(\s*(\w+)\s*\)",
        lambda m: (
            f"{m.group(1)} >= toDateTime({from_ms // 1000}) "
            f"AND {m.group(1)} <= toDateTime({to_ms // 1000})"
        ),
        sql,
    )
    sql = re.sub(
        r"\$__timeInterval\(\s*(\w+)\s*\)",
        lambda m: f"toStartOfInterval(toDateTime({m.group(1)}), INTERVAL 1 second)",
        sql,
    )
    sql = re.sub(
        r"\$__timeInterval_ms\(\s*(\w+)\s*\)",
        lambda m: (
            f"toStartOfInterval(toDateTime64({m.group(1)}, 3), INTERVAL {INTERVAL_MS} millisecond)"
        ),
        sql,
    )
    sql = sql.replace("${decode_node:singlequote}", ",".join(f"'{n}'" for n in decode_nodes))
    sql = sql.replace("${decode_node}", node)
    assert "$" not in sql, f"a macro or variable the test cannot expand: {sql}"
    return sql


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def _variable(name: str) -> dict[str, Any]:
    return next(v for v in _dashboard()["templating"]["list"] if v["name"] == name)


def _panel(title_start: str) -> dict[str, Any]:
    return next(p for p in _dashboard()["panels"] if p["title"].startswith(title_start))


def _run(
    stack: LocalStack, target: dict[str, Any], window: tuple[int, int], node: str = ""
) -> list[dict[str, Any]]:
    nodes = [r["node"] for r in stack.query(expand(_variable("decode_node")["query"], window, []))]
    return stack.query(expand(target["rawSql"], window, nodes, node))


def test_the_decode_node_variable_lists_the_decode_nodes(
    stack: LocalStack, window: tuple[int, int]
) -> None:
    rows = stack.query(expand(_variable("decode_node")["query"], window, []))
    assert [r["node"] for r in rows] == sorted(stack.decode)


def test_every_clickhouse_query_runs_and_returns_rows(
    stack: LocalStack, window: tuple[int, int]
) -> None:
    ran = 0
    for panel in _dashboard()["panels"]:
        for target in panel["targets"]:
            if target["datasource"]["type"] != "grafana-clickhouse-datasource":
                continue
            nodes = sorted(stack.decode) if panel.get("repeat") == "decode_node" else [""]
            for node in nodes:
                rows = _run(stack, target, window, node)
                assert rows, f"{panel['title']} ({node}) returned no rows"
                if target["queryType"] == "timeSeries":
                    # Grafana's time series want the time first.
                    assert next(iter(rows[0])) == "time", panel["title"]
                ran += 1
    assert ran >= 6


def test_panels_show_what_the_tables_hold(stack: LocalStack, window: tuple[int, int]) -> None:
    where = expand("$__timeFilter_ms(ts)", window, [])
    (heatmap_target,) = _panel("ITL heatmap")["targets"]
    for node in stack.decode:
        cells = _run(stack, heatmap_target, window, node)
        (want,) = stack.query(
            f"SELECT count() AS n FROM tokentrace.token_latencies WHERE {where} "
            f"AND itl_s > 0 AND node = '{node}'"
        )
        assert len(cells) == want["n"]

    (kv_target,) = _panel("KV transfer bandwidth per")["targets"]
    bars = _run(stack, kv_target, window)
    pairs = stack.query(
        "SELECT src_node, dst_node, sum(bytes) / sum(duration_s) AS bw "
        f"FROM tokentrace.kv_transfers WHERE {where} AND duration_s > 0 "
        "GROUP BY src_node, dst_node"
    )
    assert {b["pair"]: b["bandwidth"] for b in bars} == pytest.approx(
        {f"{p['src_node']} → {p['dst_node']}": p["bw"] for p in pairs}
    )

    (slow_target,) = _panel("Slowest requests")["targets"]
    slow = _run(stack, slow_target, window)
    (top,) = stack.query(f"SELECT max(e2e_s) AS e2e FROM tokentrace.requests WHERE {where}")
    assert slow[0]["e2e_s"] == top["e2e"]
    assert [r["e2e_s"] for r in slow] == sorted((r["e2e_s"] for r in slow), reverse=True)

    (prefill_target,) = _panel("ITL on engine steps with / without prefill")["targets"]
    steps = {r["node"]: r for r in _run(stack, prefill_target, window)}
    gaps = stack.query(
        f"SELECT node, count() AS n FROM tokentrace.token_latencies WHERE {where} "
        "AND itl_s IS NOT NULL GROUP BY node"
    )
    assert {node: r["gaps"] for node, r in steps.items()} == {g["node"]: g["n"] for g in gaps}
    # Disaggregated decode workers' steps never carry a prompt's prefill.
    assert all(r["gaps_on_prefill_steps"] == 0 for r in steps.values())
    assert all(r["p50_with_prefill_s"] is None for r in steps.values())
    assert all(r["p50_without_prefill_s"] <= r["p99_without_prefill_s"] for r in steps.values())

    # The ITL-over-time panel reads the per-minute sketches: every decode node, its
    # percentiles in order.
    (itl_target,) = _panel("ITL per decode node")["targets"]
    series = _run(stack, itl_target, window)
    assert {p["node"] for p in series} == set(stack.decode)
    assert all(p["p50"] <= p["p90"] <= p["p99"] for p in series)

    (ttft_target,) = _panel("TTFT per prefill node")["targets"]
    points = _run(stack, ttft_target, window)
    assert {p["node"] for p in points} == set(stack.prefill)
    assert all(p["p50"] <= p["p90"] <= p["p99"] for p in points)
