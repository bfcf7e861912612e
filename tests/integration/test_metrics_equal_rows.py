"""Every process's ``GET /metrics`` after a real run agrees with what ClickHouse stored
for the same run: the histograms count exactly the rows their definitions match.

Collector + router + 1 prefill + 2 decode workers as real processes on loopback
(the module's stack), streaming load through the router plus one non-streaming request
and one the router refuses, so both request statuses appear.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokentrace.serving.load import LoadResult, run_load
from tokentrace.serving.stack import LocalStack

REQUESTS = 8
CONCURRENCY = 2
INPUT_LEN = 96
OUTPUT_LEN = 8
MODEL = "tt-tiny"

Samples = list[tuple[str, dict[str, str], float]]


def _scrape(base_url: str) -> Samples:
    resp = httpx.get(f"{base_url}/metrics", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    ]


def _total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over every sample whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and labels.items() <= lab.items())


def _one(stack: LocalStack, sql: str) -> Any:
    rows = stack.query(sql)
    return next(iter(rows[0].values()))


@pytest.fixture(scope="module")
def run(stack: LocalStack) -> LoadResult:
    """The run: streaming load, one non-streaming request, one refused request; returns
    once ClickHouse holds every request, token and transfer of it."""
    result = asyncio.run(
        run_load(stack.router_url, REQUESTS, CONCURRENCY, INPUT_LEN, OUTPUT_LEN, progress=False)
    )
    assert all(r.success for r in result.records), [r.error for r in result.records]
    plain = httpx.post(
        f"{stack.router_url}/v1/completions",
        json={"model": MODEL, "prompt": "x" * INPUT_LEN, "max_tokens": OUTPUT_LEN},
        timeout=60,
    )
    assert plain.status_code == 200, plain.text
    refused = httpx.post(f"{stack.router_url}/v1/completions", content=b"{not json", timeout=10)
    assert refused.status_code == 400
    served = REQUESTS + 1
    stack.wait_for_rows("SELECT count() FROM tokentrace.requests", served + 1)
    stack.wait_for_rows("SELECT count() FROM tokentrace.kv_transfers", served)
    stack.wait_for_rows("SELECT sum(tokens) FROM tokentrace.token_latencies", served * OUTPUT_LEN)
    for name in ("llm.request", "llm.prefill", "llm.decode"):
        stack.wait_for_rows(
            f"SELECT count() FROM tokentrace.otel_traces WHERE SpanName = '{name}'",
            served + (name == "llm.request"),
        )
    return result


def test_router_request_metrics_equal_the_requests_rows(stack: LocalStack, run: LoadResult) -> None:
    samples = _scrape(stack.router_url)
    rows = stack.query(
        "SELECT status, count() AS n, countIf(ttft_s IS NOT NULL) AS ttft, "
        "sum(ttft_s) AS ttft_sum, countIf(tpot_s IS NOT NULL) AS tpot "
        "FROM tokentrace.requests GROUP BY status"
    )
    by_status = {r["status"]: r for r in rows}
    assert set(by_status) == {"ok", "error"}
    for status, row in by_status.items():
        assert _total(samples, "tokentrace_requests_total", status=status) == row["n"], status
    assert _total(samples, "gen_ai_server_request_duration_seconds_count") == sum(
        r["n"] for r in rows
    )
    ttft = _total(samples, "gen_ai_server_time_to_first_token_seconds_count")
    assert ttft == sum(r["ttft"] for r in rows) == REQUESTS + 1
    ttft_sum = _total(samples, "gen_ai_server_time_to_first_token_seconds_sum")
    assert ttft_sum == pytest.approx(sum(r["ttft_sum"] or 0 for r in rows), rel=1e-9)
    assert _total(samples, "gen_ai_server_time_per_output_token_seconds_count") == sum(
        r["tpot"] for r in rows
    )
    # Only the router observes requests: the workers' request metrics stay empty.
    for url in [*stack.prefill.values(), *stack.decode.values()]:
        assert _total(_scrape(url), "tokentrace_requests_total") == 0, url


def test_itl_histograms_equal_the_token_latencies_rows_per_decode_node(
    stack: LocalStack, run: LoadResult
) -> None:
    rows = stack.query(
        "SELECT node, count() AS n, sum(itl_s) AS itl_sum FROM tokentrace.token_latencies "
        "WHERE itl_s IS NOT NULL GROUP BY node"
    )
    by_node = {r["node"]: r for r in rows}
    assert set(by_node) <= set(stack.decode) and by_node
    for node, url in stack.decode.items():
        samples = _scrape(url)
        labels = {"node": node, "role": "decode", "model": MODEL}
        count = _total(samples, "tokentrace_inter_token_latency_seconds_count", **labels)
        row = by_node.get(node, {"n": 0, "itl_sum": 0.0})
        assert count == row["n"], node
        total = _total(samples, "tokentrace_inter_token_latency_seconds_sum", **labels)
        assert total == pytest.approx(row["itl_sum"], rel=1e-6, abs=1e-9), node
    prefill = _scrape(stack.prefill["prefill-0"])
    assert _total(prefill, "tokentrace_inter_token_latency_seconds_count") == 0


def test_kv_transfer_histograms_equal_the_kv_transfers_rows(
    stack: LocalStack, run: LoadResult
) -> None:
    rows = stack.query(
        "SELECT dst_node, status, count() AS n, sum(bytes) AS bytes "
        "FROM tokentrace.kv_transfers GROUP BY dst_node, status"
    )
    seen: Counter[tuple[str, str]] = Counter()
    for row in rows:
        seen[(row["dst_node"], row["status"])] = row["n"]
        samples = _scrape(stack.decode[row["dst_node"]])
        labels = {"node": row["dst_node"], "status": row["status"], "model": MODEL}
        assert (
            _total(samples, "tokentrace_kv_transfer_duration_seconds_count", **labels) == row["n"]
        )
        assert _total(samples, "tokentrace_kv_transfer_bytes_count", **labels) == row["n"]
        assert _total(samples, "tokentrace_kv_transfer_bytes_sum", **labels) == row["bytes"]
    assert sum(seen.values()) == REQUESTS + 1
    for node, url in stack.decode.items():  # no transfer observed without a row
        observed = _total(_scrape(url), "tokentrace_kv_transfer_duration_seconds_count")
        assert observed == sum(n for (dst, _), n in seen.items() if dst == node), node


def test_workers_report_queue_depth_and_batch_size_with_their_identity(
    stack: LocalStack, run: LoadResult
) -> None:
    nodes = {**{n: "prefill" for n in stack.prefill}, **{n: "decode" for n in stack.decode}}
    for node, role in nodes.items():
        samples = _scrape(stack.prefill.get(node) or stack.decode[node])
        labels = {"node": node, "role": role, "model": MODEL}
        for name in ("tokentrace_queue_depth", "tokentrace_running_batch_size"):
            found = [v for n, lab, v in samples if n == name and lab == labels]
            assert found == [0.0], (node, name, found)  # idle once the run is stored


def test_collector_spans_stored_equals_otel_traces_rows(stack: LocalStack, run: LoadResult) -> None:
    # Rows become visible a moment before the counter moves (it counts after the
    # insert returns): compare until they agree or the collector has been idle a while.
    deadline = time.monotonic() + 30
    while True:
        samples = _scrape(stack.collector_http)
        stored = _total(samples, "tokentrace_collector_spans_stored_total")
        rows = _one(stack, "SELECT count() FROM tokentrace.otel_traces")
        if stored == rows or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert stored == rows > 0
    received = _total(samples, "tokentrace_collector_spans_received_total")
    rejected = _total(samples, "tokentrace_collector_spans_rejected_total")
    assert received - rejected == stored
    assert _total(samples, "tokentrace_collector_store_ok") == 1
    assert _total(samples, "tokentrace_collector_insert_duration_seconds_count") >= 1
    assert _total(samples, "tokentrace_collector_wal_pending_records") == 0
    assert _total(samples, "tokentrace_collector_queued_exports") == 0
    assert _total(samples, "tokentrace_collector_store_lag_seconds") == 0
