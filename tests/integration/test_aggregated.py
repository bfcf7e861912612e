"""Aggregated serving end to end: a worker with ``--role both`` behind a router with
``--worker``, beside a disaggregated pair (one prefill, one decode worker) on the same
collector, all real processes on loopback. Once with token emissions packed (the
default: ClickHouse expands packed version 2) and once as one span each (the collector
derives the rows): every test here holds in both.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from rich.console import Console

from tokentrace.serving import openai_protocol as P
from tokentrace.serving.demo import comparison, comparison_rows, print_comparison
from tokentrace.serving.load import LoadResult, run_load
from tokentrace.serving.stack import LocalStack

PROMPTS = [
    "Aggregated serving runs prefill and decode in one engine.",
    "x",
    "Disaggregated serving moves the KV cache between two nodes " * 3,
]
LONG_PROMPT = "the first request decodes while the second is prefilled " * 2
SHORT_PROMPT = "prefilled inside a running request's step"


@pytest.fixture(scope="module", params=["packed", "spans"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    s = LocalStack(
        tmp_path_factory.mktemp(f"aggregated-{request.param}"),
        prefill_workers=1,
        decode_workers=1,
        both_workers=1,
        token_spans=request.param,
    )
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _complete(url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    resp = httpx.post(
        f"{url}/v1/completions",
        json={"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_greedy_output_equals_the_disaggregated_pairs(stack: LocalStack) -> None:
    aggregated, disaggregated = stack.router_urls["aggregated"], stack.router_urls["disaggregated"]
    for prompt in PROMPTS:
        a = _complete(aggregated, prompt, 24)
        d = _complete(disaggregated, prompt, 24)
        assert a["choices"][0]["text"] == d["choices"][0]["text"], prompt
        assert a["usage"] == d["usage"]


@pytest.fixture(scope="module")
def overlapped(stack: LocalStack) -> dict[str, str]:
    """A long streamed request on the both-worker, and a short one sent once the long one
    has streamed its first token and answered in full while the long one still streams:
    so the short one's prompt was prefilled in a step of the long one. Request ids by
    role ("long", "short")."""
    url = stack.router_urls["aggregated"]
    started, short_done = threading.Event(), threading.Event()
    chunks_after_short: list[str] = []
    ids: dict[str, str] = {}

    def stream_long() -> None:
        body = {"prompt": LONG_PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
            ids["long"] = resp.headers["x-request-id"]
            for line in P.iter_sse_lines(resp.iter_bytes()):
                if line.startswith("data: {"):
                    started.set()
                    if short_done.is_set():
                        chunks_after_short.append(line)

    thread = threading.Thread(target=stream_long)
    thread.start()
    try:
        assert started.wait(60), "the long request never streamed"
        resp = httpx.post(
            f"{url}/v1/completions",
            json={"prompt": SHORT_PROMPT, "max_tokens": 8, "ignore_eos": True},
            timeout=60,
        )
        assert resp.status_code == 200, resp.text
        ids["short"] = resp.headers["x-request-id"]
        short_done.set()
    finally:
        thread.join(120)
    # The premise: the long request was still decoding after the short one finished.
    assert chunks_after_short, "the long request ended before the short one was served"
    stack.wait_for_rows(
        "SELECT count() FROM tokentrace.requests WHERE router_node = 'router-agg' "
        f"AND request_id IN ('{ids['long']}', '{ids['short']}') AND prefill_s IS NOT NULL "
        "AND decode_node IS NOT NULL",
        2,
    )
    stack.wait_for_rows(
        "SELECT sum(tokens) FROM tokentrace.token_latencies WHERE trace_id IN (SELECT trace_id "
        f"FROM tokentrace.requests WHERE request_id IN ('{ids['long']}', '{ids['short']}'))",
        408,
    )
    return ids


def _token_rows(stack: LocalStack, request_id: str) -> list[dict[str, Any]]:
    return stack.query(
        "SELECT token_index, batch_size, step_prefill_tokens FROM tokentrace.token_latencies "
        "WHERE trace_id = (SELECT trace_id FROM tokentrace.requests "
        f"WHERE request_id = '{request_id}') ORDER BY token_index"
    )


def test_a_prompt_prefilled_during_a_decode_shows_on_its_step(
    stack: LocalStack, overlapped: dict[str, str]
) -> None:
    long_rows = _token_rows(stack, overlapped["long"])
    short_rows = _token_rows(stack, overlapped["short"])
    assert len(long_rows) == 400 and len(short_rows) == 8
    # Each request's first emission comes from the step that prefilled its own prompt
    # (the long one alone then).
    assert (long_rows[0]["step_prefill_tokens"], long_rows[0]["batch_size"]) == (
        len(LONG_PROMPT),
        1,
    )
    assert (short_rows[0]["step_prefill_tokens"], short_rows[0]["batch_size"]) == (
        len(SHORT_PROMPT),
        2,
    )
    # Exactly one of the long request's later emissions shared that step: it carries the
    # short prompt's tokens; every other step of it prefilled nothing.
    later = [r["step_prefill_tokens"] for r in long_rows[1:]]
    assert later.count(len(SHORT_PROMPT)) == 1
    assert sorted(set(later)) == [0, len(SHORT_PROMPT)]
    assert [r["step_prefill_tokens"] for r in short_rows[1:]] == [0] * 7


def test_token_spans_carry_batch_size_and_prefill_tokens_per_step(
    stack: LocalStack, overlapped: dict[str, str]
) -> None:
    """In otel_traces (expanded by ClickHouse from packed version 2): all token spans of
    one engine step carry the same batch size and prefill count, and a step carries
    prefill tokens exactly when it holds some request's first emission — as many as
    those requests' prompts have."""
    rows = stack.query(
        "SELECT t.SpanAttributes AS attrs, p.SpanAttributes['gen_ai.usage.input_tokens'] AS n "
        "FROM tokentrace.otel_traces AS t INNER JOIN tokentrace.otel_traces AS p "
        "ON t.ParentSpanId = p.SpanId AND t.TraceId = p.TraceId "
        "WHERE t.SpanName = 'llm.token' AND p.SpanName = 'llm.decode' "
        "AND t.ResourceAttributes['tokentrace.node.id'] = 'both-0'"
    )
    assert rows
    steps: dict[int, list[tuple[int, int, int, int]]] = {}
    for row in rows:
        a = row["attrs"]
        step = int(a["tokentrace.engine.step"])
        steps.setdefault(step, []).append(
            (
                int(a["tokentrace.batch.size"]),
                int(a["tokentrace.step.prefill_tokens"]),
                int(a["tokentrace.token.index"]),
                int(row["n"]),
            )
        )
    for step, spans in steps.items():
        assert len({(b, p) for b, p, _, _ in spans}) == 1, step
        batch, prefill = spans[0][0], spans[0][1]
        assert batch == len(spans), step
        assert prefill == sum(n for _, _, index, n in spans if index == 0), step
    assert any(p > 0 and b > 1 for b, p, _, _ in (s[0] for s in steps.values()))


def test_disaggregated_decode_steps_report_no_prefill(
    stack: LocalStack, overlapped: dict[str, str]
) -> None:
    """The decode worker recomputes each prompt's last token as an ordinary batch row:
    its steps report 0 prefill tokens, never NULL (unknown)."""
    rows = stack.query(
        "SELECT count() AS n, countIf(step_prefill_tokens = 0) AS zero "
        "FROM tokentrace.token_latencies WHERE node = 'decode-0'"
    )
    assert rows[0]["n"] > 0 and rows[0]["zero"] == rows[0]["n"]


def test_aggregated_requests_rows_read_like_disaggregated_ones(
    stack: LocalStack, overlapped: dict[str, str]
) -> None:
    rows = stack.query(
        "SELECT * FROM tokentrace.requests WHERE request_id = "
        f"'{overlapped['short']}' OR request_id = '{overlapped['long']}'"
    )
    assert len(rows) == 2
    for row in rows:
        assert row["router_node"] == "router-agg"
        assert row["prefill_node"] == row["decode_node"] == "both-0"
        assert row["status"] == "ok" and row["ttft_s"] > 0 and row["e2e_s"] >= row["ttft_s"]
        assert row["prefill_s"] > 0 and row["kv_transfer_s"] is None
        # Nothing was handed from one node to another.
        assert row["prefill_to_decode_s"] is None and row["kv_handoff_s"] is None
        assert row["decode_dispatch_s"] is not None


@pytest.fixture(scope="module")
def workload(stack: LocalStack, overlapped: dict[str, str]) -> tuple[float, dict[str, LoadResult]]:
    """The same seeded paced workload against each deployment, as the demo runs it."""
    import time

    since = time.time() - 1.0
    results = {
        deployment: asyncio.run(run_load(url, 8, 8, 64, 12, progress=False, request_rate=20.0))
        for deployment, url in stack.router_urls.items()
    }
    for deployment, result in results.items():
        assert all(r.success for r in result.records), deployment
    stack.wait_for_rows(
        "SELECT count() FROM tokentrace.requests WHERE ts >= "
        f"fromUnixTimestamp64Milli({int(since * 1000)}) AND prefill_s IS NOT NULL "
        "AND decode_node IS NOT NULL",
        16,
    )
    stack.wait_for_rows(
        "SELECT sum(tokens) FROM tokentrace.token_latencies WHERE ts >= "
        f"fromUnixTimestamp64Milli({int(since * 1000)})",
        16 * 12,
    )
    return since, results


def test_comparison_numbers_equal_numpy_over_the_raw_rows(
    stack: LocalStack, workload: tuple[float, dict[str, LoadResult]]
) -> None:
    """The demo's side-by-side numbers, recomputed from the stored rows with numpy."""
    since, results = workload
    got = comparison(stack, since)
    assert set(got) == {"aggregated", "disaggregated"}
    since_sql = f"fromUnixTimestamp64Milli({int(since * 1000)})"
    for deployment, node in stack.router_nodes.items():
        requests = stack.query(
            "SELECT trace_id, ttft_s, e2e_s, output_tokens, toUnixTimestamp64Nano(ts) AS t0 "
            f"FROM tokentrace.requests WHERE ts >= {since_sql} AND router_node = '{node}'"
        )
        assert len(requests) == 8
        traces = {r["trace_id"] for r in requests}
        gaps = [
            r
            for r in stack.query(
                "SELECT trace_id, itl_s, step_prefill_tokens FROM tokentrace.token_latencies "
                f"WHERE ts >= {since_sql} AND itl_s IS NOT NULL"
            )
            if r["trace_id"] in traces
        ]
        numbers = got[deployment]
        assert numbers["requests"] == numbers["ok"] == 8
        q = [50, 90, 99]
        ttft = np.percentile([r["ttft_s"] for r in requests], q)
        e2e = np.percentile([r["e2e_s"] for r in requests], q)
        itl_values = [r["itl_s"] for r in gaps]
        itl = np.percentile(itl_values, q)
        assert numbers["ttft"] == pytest.approx(list(ttft))
        assert numbers["e2e"] == pytest.approx(list(e2e))
        assert numbers["itl"] == pytest.approx(list(itl))
        assert numbers["gaps"] == len(gaps) == 8 * 11
        tail = [r for r in gaps if r["itl_s"] > numbers["itl"][1]]
        assert numbers["tail"] == len(tail)
        assert numbers["tail_on_prefill"] == sum(1 for r in tail if r["step_prefill_tokens"])
        assert numbers["on_prefill"] == sum(1 for r in gaps if r["step_prefill_tokens"])
        with_prefill = [r["itl_s"] for r in gaps if r["step_prefill_tokens"]]
        without = [r["itl_s"] for r in gaps if not r["step_prefill_tokens"]]
        assert numbers["itl_decode_mean"] == pytest.approx(np.mean(without))
        if with_prefill:
            assert numbers["itl_prefill_mean"] == pytest.approx(np.mean(with_prefill))
        end = max(r["t0"] + r["e2e_s"] * 1e9 for r in requests)
        wall_s = (end - min(r["t0"] for r in requests)) / 1e9
        assert numbers["wall_s"] == pytest.approx(wall_s)
        assert numbers["output_tokens"] == sum(r["output_tokens"] for r in requests) == 8 * 12
        if deployment == "disaggregated":
            assert numbers["on_prefill"] == 0

    console = Console(record=True, width=200)
    print_comparison(stack, since, console)
    text = console.export_text()
    for deployment in ("aggregated", "disaggregated"):
        for metric, value in comparison_rows(got[deployment]):
            line = next(line for line in text.splitlines() if f" {metric} " in line)
            assert f" {value} " in line, (metric, value, line)


def test_demo_mode_both_prints_the_comparison(tmp_path: Path) -> None:
    """``tokentrace demo --mode both`` at its smallest: both deployments' rows are there
    and the table prints."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokentrace",
            "demo",
            "--mode",
            "both",
            "--requests",
            "2",
            "--input-len",
            "16",
            "--output-len",
            "4",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "Aggregated vs disaggregated" in out
    header = next(line for line in out.splitlines() if "disaggregated" in line and "┃" in line)
    assert "aggregated" in header.replace("disaggregated", "")
    requests_row = next(line for line in out.splitlines() if "requests (ok)" in line)
    assert requests_row.count("2 (2)") == 2
    itl_row = next(line for line in out.splitlines() if "ITL p50 ms" in line)
    assert "—" not in itl_row
