"""Cross-node clock alignment, end to end: the same workload runs on a stack whose clocks
agree and on one whose decode worker's clock is 80 ms fast and whose prefill worker's is
50 ms slow (``TOKENTRACE_CLOCK_SKEW_MS``). The router's offset estimates land in
``node_clocks``, the cross-node intervals in ``requests`` come out as they would have on
agreeing clocks, none is negative, and the Jaeger API shows no child before its parent.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tokentrace.serving.load import run_load
from tokentrace.serving.stack import LocalStack

REQUESTS = 16
CONCURRENCY = 2
SKEW_MS = {"decode-0": 80.0, "prefill-0": -50.0}
INTERVALS = ("prefill_dispatch_s", "decode_dispatch_s", "prefill_to_decode_s", "kv_handoff_s")
TOLERANCE_S = 0.002


@dataclass
class Run:
    requests: list[dict[str, Any]]
    clocks: dict[str, dict[str, Any]]  # node -> its latest node_clocks row
    traces: list[dict[str, Any]]  # Jaeger v1 traces of every request
    raw: dict[str, dict[str, float]]  # trace id -> interval -> as the spans' clocks tell it


def _run(data_dir: Any, skew: dict[str, float]) -> Run:
    env = {node: {"TOKENTRACE_CLOCK_SKEW_MS": str(ms)} for node, ms in skew.items()}
    stack = LocalStack(data_dir, prefill_workers=1, decode_workers=1, node_env=env)
    stack.start()
    try:
        result = asyncio.run(run_load(stack.router_url, REQUESTS, CONCURRENCY, 200, 8))
        assert all(r.success for r in result.records), [r.error for r in result.records]
        stack.wait_for_rows(
            "SELECT count() FROM tokentrace.requests WHERE kv_handoff_s IS NOT NULL "
            "AND prefill_dispatch_s IS NOT NULL AND decode_dispatch_s IS NOT NULL",
            REQUESTS,
        )
        requests = stack.query("SELECT * FROM tokentrace.requests")
        clocks = stack.query(
            "SELECT node, argMax(offset_s, ts) AS offset_s, argMax(error_s, ts) AS error_s, "
            "any(reference_node) AS reference_node, count() AS rows "
            "FROM tokentrace.node_clocks GROUP BY node"
        )
        traces = []
        for row in requests:
            resp = httpx.get(f"{stack.collector_http}/api/traces/{row['trace_id']}", timeout=30)
            assert resp.status_code == 200, resp.text
            traces.extend(resp.json()["data"])
        return Run(requests, {c["node"]: c for c in clocks}, traces, _raw_intervals(stack))
    finally:
        stack.stop()


def _raw_intervals(stack: LocalStack) -> dict[str, dict[str, float]]:
    """Each request's cross-node intervals straight from the stored spans' own times."""
    spans = stack.query(
        "SELECT TraceId, SpanName, toUnixTimestamp64Nano(Timestamp) AS start, Duration, "
        "SpanAttributes['tokentrace.prefill.sent_unix_nano'] AS p_sent, "
        "SpanAttributes['tokentrace.decode.sent_unix_nano'] AS d_sent "
        "FROM tokentrace.otel_traces WHERE SpanName IN "
        "('llm.request', 'llm.prefill', 'llm.decode', 'llm.kv_transfer')"
    )
    by_trace: dict[str, dict[str, dict[str, Any]]] = {}
    for span in spans:
        by_trace.setdefault(span["TraceId"], {})[span["SpanName"]] = span
    out = {}
    for trace_id, t in by_trace.items():
        req, pre, dec, kv = (
            t[n] for n in ("llm.request", "llm.prefill", "llm.decode", "llm.kv_transfer")
        )
        prefill_end = pre["start"] + pre["Duration"]
        out[trace_id] = {
            "prefill_dispatch_s": (pre["start"] - int(req["p_sent"])) / 1e9,
            "decode_dispatch_s": (dec["start"] - int(req["d_sent"])) / 1e9,
            "prefill_to_decode_s": (dec["start"] - prefill_end) / 1e9,
            "kv_handoff_s": (kv["start"] - prefill_end) / 1e9,
        }
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Run, Run]]:
    plain = _run(tmp_path_factory.mktemp("clocks-agree"), {})
    skewed = _run(tmp_path_factory.mktemp("clocks-skewed"), SKEW_MS)
    yield plain, skewed


def test_node_clocks_hold_the_injected_offsets(runs: tuple[Run, Run]) -> None:
    plain, skewed = runs
    for node, ms in SKEW_MS.items():
        row = skewed.clocks[node]
        assert row["offset_s"] == pytest.approx(ms / 1000, abs=TOLERANCE_S), row
        assert 0 <= row["error_s"] < TOLERANCE_S, row
        assert row["reference_node"] == "router-0"
        assert abs(plain.clocks[node]["offset_s"]) < TOLERANCE_S, plain.clocks[node]


def _injected(name: str) -> float:
    p, d = SKEW_MS["prefill-0"] / 1000, SKEW_MS["decode-0"] / 1000
    return {
        "prefill_dispatch_s": p,
        "decode_dispatch_s": d,
        "prefill_to_decode_s": d - p,
        "kv_handoff_s": d - p,
    }[name]


def test_cross_node_intervals_are_what_they_would_be_without_skew(runs: tuple[Run, Run]) -> None:
    # The skew is known exactly, so the same requests' intervals on agreeing clocks are
    # the raw intervals minus the injected skew: each stored one is within 2 ms of that.
    _, skewed = runs
    for r in skewed.requests:
        raw = skewed.raw[r["trace_id"]]
        for name in INTERVALS:
            without_skew = raw[name] - _injected(name)
            assert r[name] == pytest.approx(without_skew, abs=TOLERANCE_S), (name, r, raw)
            assert abs(raw[name] - r[name]) > 0.040  # the skew really was there to correct


def test_no_cross_node_interval_is_negative(runs: tuple[Run, Run]) -> None:
    for run in runs:
        for name in INTERVALS:
            values = [r[name] for r in run.requests]
            assert all(v is not None and v >= 0 for v in values), (name, values)


def test_skewed_and_agreeing_runs_look_alike(runs: tuple[Run, Run]) -> None:
    # Two separate runs on a busy 2-core machine differ by a few ms of scheduling noise;
    # an uncorrected (or wrongly corrected) skew would be 50-130 ms off.
    plain, skewed = runs
    for name in INTERVALS:
        expected = statistics.median(r[name] for r in plain.requests)
        got = statistics.median(r[name] for r in skewed.requests)
        assert got == pytest.approx(expected, abs=0.010), (name, expected, got)


def _by_id(trace: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["spanID"]: s for s in trace["spans"]}


def _node(trace: dict[str, Any], span: dict[str, Any]) -> str:
    tags = trace["processes"][span["processID"]]["tags"]
    return next(t["value"] for t in tags if t["key"] == "tokentrace.node.id")


def _tag(span: dict[str, Any], key: str) -> Any:
    return next((t["value"] for t in span["tags"] if t["key"] == key), None)


def test_jaeger_shows_no_child_before_its_parent(runs: tuple[Run, Run]) -> None:
    _, skewed = runs
    assert len(skewed.traces) == REQUESTS
    for trace in skewed.traces:
        spans = _by_id(trace)
        for span in spans.values():
            node = _node(trace, span)
            adjusted = _tag(span, "tokentrace.clock.adjustment_us")
            if node in SKEW_MS:
                # Moved back by the injected skew, and said so.
                assert adjusted == pytest.approx(-SKEW_MS[node] * 1000, abs=TOLERANCE_S * 1e6)
                assert span["warnings"], span
            else:
                assert adjusted is None, span
            for ref in span["references"]:
                parent = spans.get(ref["spanID"])
                if ref["refType"] == "CHILD_OF" and parent is not None:
                    assert span["startTime"] >= parent["startTime"], (span, parent)
