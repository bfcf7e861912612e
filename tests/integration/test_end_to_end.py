"""End to end: collector + router + 1 prefill + 2 decode workers as real processes on
loopback, streaming load from ``tokentrace load``, everything read back from ClickHouse;
once with token emissions sent packed and once as one span each.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tokentrace.runtime.layout import models_dir
from tokentrace.serving.engine import ModelConfig
from tokentrace.serving.load import LoadResult, run_load
from tokentrace.serving.stack import LocalStack

REQUESTS = 24
# Two in flight keep this 2-core machine (five processes, three of them CPU engines)
# below saturation, so timing comparisons measure tokentrace, not the scheduler.
CONCURRENCY = 2
INPUT_LEN = 200
OUTPUT_LEN = 16


@pytest.fixture(scope="module", params=["packed", "spans"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    """The spine's stack once per token wire mode: every test here holds in both."""
    s = LocalStack(
        tmp_path_factory.mktemp(f"e2e-{request.param}"),
        prefill_workers=1,
        decode_workers=2,
        token_spans=request.param,
    )
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def load(stack: LocalStack) -> LoadResult:
    result = asyncio.run(
        run_load(stack.router_url, REQUESTS, CONCURRENCY, INPUT_LEN, OUTPUT_LEN, progress=False)
    )
    failed = [r.error for r in result.records if not r.success]
    assert not failed, failed
    expected_tokens = sum(r.output_tokens or 0 for r in result.records)
    assert expected_tokens == REQUESTS * OUTPUT_LEN
    stack.wait_for_rows("SELECT count() FROM tokentrace.requests", REQUESTS)
    stack.wait_for_rows("SELECT sum(tokens) FROM tokentrace.token_latencies", expected_tokens)
    stack.wait_for_rows("SELECT count() FROM tokentrace.kv_transfers", REQUESTS)
    # Each process exports on its own schedule: wait for every process's spans.
    for name in ("llm.request", "llm.prefill", "llm.decode"):
        stack.wait_for_rows(
            f"SELECT count() FROM tokentrace.otel_traces WHERE SpanName = '{name}'", REQUESTS
        )
    return result


def _requests_by_id(stack: LocalStack) -> dict[str, dict[str, Any]]:
    rows = stack.query("SELECT * FROM tokentrace.requests")
    return {r["request_id"]: r for r in rows}


def test_one_trace_per_request_across_router_prefill_and_decode(
    stack: LocalStack, load: LoadResult
) -> None:
    spans = stack.query(
        "SELECT TraceId, SpanName, ResourceAttributes['tokentrace.node.id'] AS node, "
        "SpanAttributes['tokentrace.request.id'] AS rid FROM tokentrace.otel_traces"
    )
    by_request = {r["rid"]: r["TraceId"] for r in spans if r["SpanName"] == "llm.request"}
    assert set(by_request) == {r.request_id for r in load.records}
    assert len(set(by_request.values())) == REQUESTS  # one trace per request
    for rid, trace_id in by_request.items():
        trace = [s for s in spans if s["TraceId"] == trace_id]
        names = {s["SpanName"] for s in trace}
        assert {"llm.request", "llm.prefill", "llm.kv_transfer", "llm.decode", "llm.token"} <= names
        nodes = {s["node"] for s in trace}
        assert "router-0" in nodes and "prefill-0" in nodes, (rid, nodes)
        assert nodes & {"decode-0", "decode-1"}, (rid, nodes)


def test_token_spans_equal_output_tokens(stack: LocalStack, load: LoadResult) -> None:
    packed = httpx.get(f"{stack.collector_http}/health").json()["packed_decode_spans"]
    assert packed >= REQUESTS if stack.token_spans == "packed" else packed == 0
    rows = stack.query(
        "SELECT TraceId, count() AS spans, "
        "sum(toUInt32(SpanAttributes['tokentrace.token.count'])) AS tokens "
        "FROM tokentrace.otel_traces WHERE SpanName = 'llm.token' GROUP BY TraceId"
    )
    reqs = _requests_by_id(stack)
    per_trace = {r["TraceId"]: r for r in rows}
    for rec in load.records:
        row = reqs[rec.request_id]
        assert row["output_tokens"] == rec.output_tokens == OUTPUT_LEN
        assert per_trace[row["trace_id"]]["tokens"] == OUTPUT_LEN
        assert per_trace[row["trace_id"]]["spans"] == OUTPUT_LEN  # one token per emission
    # Sent one span each, the workers' token spans are canonical: stored typed, in
    # token_spans, none as a span row.
    typed = stack.query("SELECT count() AS n FROM tokentrace.token_spans")[0]["n"]
    stored = stack.query(
        "SELECT count() AS n FROM tokentrace.otel_spans WHERE SpanName = 'llm.token'"
    )[0]["n"]
    assert (typed, stored) == (
        (REQUESTS * OUTPUT_LEN, 0) if stack.token_spans == "spans" else (0, 0)
    )


def test_router_ttft_matches_client_ttft(stack: LocalStack, load: LoadResult) -> None:
    reqs = _requests_by_id(stack)
    diffs = [abs(reqs[r.request_id]["ttft_s"] - r.ttft_s) for r in load.records]
    assert statistics.median(diffs) < 0.005, sorted(diffs)


def test_token_gaps_match_client_gaps(stack: LocalStack, load: LoadResult) -> None:
    reqs = _requests_by_id(stack)
    rows = stack.query(
        "SELECT trace_id, groupArray((token_index, itl_s, tokens)) AS toks "
        "FROM tokentrace.token_latencies GROUP BY trace_id"
    )
    by_trace = {r["trace_id"]: sorted(r["toks"]) for r in rows}
    diffs = []
    for rec in load.records:
        toks = by_trace[reqs[rec.request_id]["trace_id"]]
        assert [t[0] for t in toks] == list(range(OUTPUT_LEN))
        assert toks[0][1] is None  # the first emission has no gap
        server_gaps = [t[1] for t in toks[1:]]
        assert len(server_gaps) == len(rec.itl_s)
        diffs += [abs(a - b) for a, b in zip(server_gaps, rec.itl_s, strict=True)]
    # The client sees each gap through two more hops (decode → router → client).
    assert statistics.median(diffs) < 0.003, statistics.median(diffs)
    server_p50 = statistics.median(t[1] for toks in by_trace.values() for t in toks[1:])
    client_p50 = statistics.median(g for r in load.records for g in r.itl_s)
    assert abs(server_p50 - client_p50) < 0.002, (server_p50, client_p50)


def test_kv_transfer_bytes_match_prompt_and_model_shape(
    stack: LocalStack, load: LoadResult
) -> None:
    cfg = ModelConfig.from_json(
        (models_dir(stack.data_dir) / "tt-tiny" / "config.json").read_text()
    )
    blocks = -(-INPUT_LEN // cfg.block_size)
    expected = blocks * cfg.block_size * cfg.kv_bytes_per_token
    reqs = _requests_by_id(stack)
    traces = {reqs[r.request_id]["trace_id"] for r in load.records}
    rows = [
        r for r in stack.query("SELECT * FROM tokentrace.kv_transfers") if r["trace_id"] in traces
    ]
    assert len(rows) == REQUESTS  # one transfer per request
    for row in rows:
        assert row["bytes"] == expected
        assert row["blocks"] == blocks
        assert row["src_node"] == "prefill-0"
        assert row["dst_node"] in {"decode-0", "decode-1"}
        assert row["status"] == "ok"
        assert 0 < row["duration_s"] < 5
    assert all(reqs[r.request_id]["kv_bytes"] == expected for r in load.records)


def test_both_decode_nodes_served(stack: LocalStack, load: LoadResult) -> None:
    reqs = _requests_by_id(stack)
    nodes = [reqs[r.request_id]["decode_node"] for r in load.records]
    assert set(nodes) == {"decode-0", "decode-1"}
    assert {reqs[r.request_id]["prefill_node"] for r in load.records} == {"prefill-0"}
    assert {reqs[r.request_id]["router_node"] for r in load.records} == {"router-0"}


def test_every_process_reports_its_exporter_in_health(stack: LocalStack, load: LoadResult) -> None:
    """Router and workers count what their span exporter did; on this healthy loopback
    stack it exported every span and dropped none."""
    urls = {"router-0": stack.router_url, **stack.prefill, **stack.decode}
    for node, url in urls.items():
        deadline = time.monotonic() + 30
        while True:  # a process counts a batch once the collector's ack reaches it
            exporter = httpx.get(f"{url}/health", timeout=10).json()["exporter"]
            if exporter["exported"] > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert exporter["exported"] > 0, (node, exporter)
        assert exporter["queue_capacity"] == 65536, (node, exporter)
        dropped = ("dropped_queue_full", "dropped_export_failed", "dropped_after_shutdown")
        assert all(exporter[k] == 0 for k in dropped), (node, exporter)
        assert exporter["failed_exports"] == 0, (node, exporter)


def test_request_row_metrics_are_consistent(stack: LocalStack, load: LoadResult) -> None:
    reqs = _requests_by_id(stack)
    for rec in load.records:
        row = reqs[rec.request_id]
        assert row["input_tokens"] == INPUT_LEN
        assert row["status"] == "ok"
        assert 0 < row["ttft_s"] < row["e2e_s"]
        assert row["tpot_s"] == pytest.approx(
            (row["e2e_s"] - row["ttft_s"]) / (OUTPUT_LEN - 1), rel=1e-6
        )
        assert 0 < row["prefill_s"] < row["ttft_s"]
        assert 0 < row["kv_transfer_s"] < row["ttft_s"]


def test_disaggregated_output_equals_single_process(stack: LocalStack, load: LoadResult) -> None:
    """Greedy output through router → prefill → NIXL → decode equals one process doing
    prefill and decode with the same weights."""
    from tokentrace.serving.engine import BlockPool, ByteTokenizer, Engine, load_or_create

    model = load_or_create(models_dir(stack.data_dir), "tt-tiny")
    engine = Engine(model, BlockPool(model.config, 64))
    tok = ByteTokenizer()
    engine.start()
    try:
        for prompt in ("The quick brown fox jumps over the lazy dog. " * 3, "tokentrace", "x"):
            resp = httpx.post(
                f"{stack.router_url}/v1/completions",
                json={
                    "model": "tt-tiny",
                    "prompt": prompt,
                    "max_tokens": 24,
                    "ignore_eos": True,
                    "temperature": 0,
                },
                timeout=60,
            )
            assert resp.status_code == 200, resp.text
            expected = tok.decode(engine.generate(tok.encode(prompt), 24))
            assert resp.json()["choices"][0]["text"] == expected
    finally:
        engine.shutdown()


def test_query_command_reads_the_store(stack: LocalStack, load: LoadResult) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokentrace",
            "query",
            "--data-dir",
            str(stack.data_dir),
            "--format",
            "json",
            "SELECT node, count() AS n FROM tokentrace.token_latencies GROUP BY node ORDER BY node",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = json.loads(out.stdout)
    assert [r["node"] for r in rows] == ["decode-0", "decode-1"]
    assert sum(int(r["n"]) for r in rows) >= REQUESTS * OUTPUT_LEN


def test_data_dir_layout(stack: LocalStack) -> None:
    assert (stack.data_dir / "clickhouse").is_dir()
    assert (models_dir(stack.data_dir) / "tt-tiny" / "config.json").is_file()
    assert isinstance(stack.data_dir, Path)


def test_load_command_measures_and_writes_json(stack: LocalStack, tmp_path: Path) -> None:
    out_path = tmp_path / "load.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokentrace",
            "load",
            "--url",
            stack.router_url,
            "--requests",
            "3",
            "--concurrency",
            "1",
            "--input-len",
            "16",
            "--output-len",
            "4",
            "--json",
            str(out_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TTFT" in proc.stdout and "ITL" in proc.stdout
    report = json.loads(out_path.read_text())
    records = report["records"]
    assert len(records) == 3 and all(r["success"] for r in records)
    assert all(r["output_tokens"] == 4 and len(r["itl_s"]) == 3 for r in records)
    ids = {r["request_id"] for r in records}
    stack.wait_for_rows(
        "SELECT count() FROM tokentrace.requests WHERE request_id IN ("
        + ",".join(f"'{i}'" for i in ids)
        + ")",
        3,
    )


def test_trace_and_traces_commands(stack: LocalStack, load: LoadResult) -> None:
    env_args = ["--data-dir", str(stack.data_dir)]
    slowest = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokentrace",
            "traces",
            "--slowest",
            "3",
            "--since",
            "1h",
            *env_args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert slowest.returncode == 0, slowest.stderr
    reqs = sorted(
        stack.query("SELECT trace_id, e2e_s, output_tokens FROM tokentrace.requests"),
        key=lambda r: -r["e2e_s"],
    )
    assert reqs[0]["trace_id"] in slowest.stdout  # the slowest request is listed
    waterfall = subprocess.run(
        [sys.executable, "-m", "tokentrace", "trace", reqs[0]["trace_id"], *env_args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert waterfall.returncode == 0, waterfall.stderr
    # Other tests of this module send requests of other lengths: the slowest may be one.
    tokens = reqs[0]["output_tokens"]
    for expected in ("router-0", "prefill-0", "llm.kv_transfer", f"llm.token ×{tokens}"):
        assert expected in waterfall.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "tokentrace", "trace", "not-a-trace", *env_args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "32 hex digits" in bad.stderr


def test_demo_report_reads_every_table(stack: LocalStack, load: LoadResult) -> None:
    from rich.console import Console

    from tokentrace.collector.query.reports import REPORTS
    from tokentrace.serving.demo import print_report

    console = Console(width=200, record=True)
    print_report(stack, (0, time.time_ns() // 1_000_000 + 1), console)
    text = console.export_text()
    for report in REPORTS:
        assert report.title.split(" (")[0].split(",")[0] in text
    assert "—" not in text  # every table has rows
    for node in ("router-0", "prefill-0", "decode-0", "decode-1"):
        assert node in text
    pairs = [line for line in text.splitlines() if line.startswith("│ prefill-0 │ decode-")]
    assert len(pairs) == 4  # two node pairs in the KV and in the handoff table
