"""derive: span batch → request_parts / kv_transfers / node_clocks rows (token rows
come from ClickHouse's one definition: tests/unit/collector/test_store.py)."""

from __future__ import annotations

import pytest
from otlp_builders import T0_NS, TRACE_ID, request, span

from tokentrace.collector.ingest.decode import decode_request
from tokentrace.collector.ingest.derive import DerivedRows, derive_rows
from tokentrace.schemas import attributes as A
from tokentrace.schemas.attributes import node_of

MS = 1_000_000
TID = TRACE_ID.hex()


def _rows(resource: dict, spans: list) -> DerivedRows:
    return derive_rows(decode_request(request(resource, spans)))


def test_router_request_row() -> None:
    rows = _rows(
        {A.SERVICE_NAME: "router", A.NODE_ID: "r1"},
        [
            span(
                A.SPAN_REQUEST,
                1,
                T0_NS,
                T0_NS + 500 * MS,
                {
                    A.REQUEST_ID: "req-1",
                    A.GEN_AI_REQUEST_MODEL: "tiny",
                    A.GEN_AI_USAGE_INPUT_TOKENS: 12,
                    A.GEN_AI_USAGE_OUTPUT_TOKENS: 5,
                    A.GEN_AI_SERVER_TTFT: 0.1,
                    A.PREFILL_NODE: "p1",
                    A.DECODE_NODE: "d1",
                },
            ),
        ],
    )
    part = {k: v[0] for k, v in rows.request_parts.items()}
    assert part["trace_id"] == TID and part["ts"] == T0_NS
    assert part["request_id"] == "req-1" and part["model"] == "tiny"
    assert part["router_node"] == "r1"
    assert (part["prefill_node"], part["decode_node"]) == ("p1", "d1")
    assert (part["input_tokens"], part["output_tokens"]) == (12, 5)
    assert part["ttft_s"] == 0.1 and part["e2e_s"] == pytest.approx(0.5)
    assert part["tpot_s"] == pytest.approx((0.5 - 0.1) / 4)
    assert part["status"] == "ok"
    assert part["prefill_s"] is None and part["kv_transfer_s"] is None
    assert rows.tables().keys() == {"request_parts"}


def test_e2e_is_the_routers_to_last_content_when_it_says_so() -> None:
    """The router's e2e ends at the last chunk with choices (as a benchmark client
    times it); the span runs on past the usage chunk and [DONE]. TPOT follows it."""
    rows = _rows(
        {A.SERVICE_NAME: "router", A.NODE_ID: "r1"},
        [
            span(
                A.SPAN_REQUEST,
                1,
                T0_NS,
                T0_NS + 500 * MS,
                {A.GEN_AI_USAGE_OUTPUT_TOKENS: 5, A.GEN_AI_SERVER_TTFT: 0.1, A.E2E_S: 0.42},
            ),
        ],
    )
    assert rows.request_parts["e2e_s"] == [0.42]
    assert rows.request_parts["tpot_s"] == [pytest.approx((0.42 - 0.1) / 4)]


def test_single_output_token_has_no_tpot_and_error_status() -> None:
    rows = _rows(
        {A.SERVICE_NAME: "router"},
        [
            span(
                A.SPAN_REQUEST,
                1,
                T0_NS,
                T0_NS + 50 * MS,
                {
                    A.REQUEST_ID: "req-2",
                    A.GEN_AI_USAGE_OUTPUT_TOKENS: 1,
                    A.GEN_AI_SERVER_TTFT: 0.04,
                },
                error=True,
            ),
        ],
    )
    assert rows.request_parts["tpot_s"] == [None]
    assert rows.request_parts["status"] == ["error"]
    assert rows.request_parts["router_node"] == ["router"]  # falls back to service.name


def test_prefill_decode_parts() -> None:
    prefill = _rows(
        {A.SERVICE_NAME: "w", A.HOST_NAME: "host-p"},
        [span(A.SPAN_PREFILL, 2, T0_NS, T0_NS + 30 * MS)],
    )
    assert prefill.request_parts["prefill_node"] == ["host-p"]
    assert prefill.request_parts["prefill_s"] == [pytest.approx(0.03)]
    assert prefill.request_parts["ts"] == [None] and prefill.request_parts["request_id"] == [None]
    decode = _rows({A.NODE_ID: "d1"}, [span(A.SPAN_DECODE, 3, T0_NS, T0_NS + 1)])
    assert decode.request_parts["decode_node"] == ["d1"]
    assert decode.request_parts["prefill_s"] == [None]


def test_kv_transfer_rows() -> None:
    rows = _rows(
        {A.NODE_ID: "d1"},
        [
            span(
                A.SPAN_KV_TRANSFER,
                4,
                T0_NS,
                T0_NS + 2 * MS,
                {
                    A.KV_BYTES: 1 << 20,
                    A.KV_BLOCKS: 16,
                    A.KV_BACKEND: "nixl/UCX",
                    A.KV_SRC_NODE: "p1",
                    A.KV_DST_NODE: "d1",
                },
            ),
        ],
    )
    assert rows.request_parts["kv_transfer_s"] == [pytest.approx(0.002)]
    assert rows.request_parts["kv_bytes"] == [1 << 20]
    kv = {k: v[0] for k, v in rows.kv_transfers.items()}
    assert kv == {
        "ts": T0_NS,
        "trace_id": TID,
        "src_node": "p1",
        "dst_node": "d1",
        "duration_s": pytest.approx(0.002),
        "bytes": 1 << 20,
        "blocks": 16,
        "backend": "nixl/UCX",
        "status": "ok",
    }


def test_unparsable_or_out_of_range_attributes_become_null_or_default() -> None:
    rows = _rows(
        {},
        [
            span(
                A.SPAN_REQUEST,
                1,
                T0_NS,
                T0_NS + MS,
                {
                    A.REQUEST_ID: "r",
                    A.GEN_AI_USAGE_OUTPUT_TOKENS: "many",
                    A.GEN_AI_USAGE_INPUT_TOKENS: -3,
                    A.GEN_AI_SERVER_TTFT: "soon",
                },
            ),
        ],
    )
    assert rows.request_parts["output_tokens"] == [None]
    assert rows.request_parts["input_tokens"] == [None]
    assert rows.request_parts["ttft_s"] == [None] and rows.request_parts["tpot_s"] == [None]
    assert rows.request_parts["router_node"] == [None]


def test_node_fallback_order() -> None:
    assert node_of({A.NODE_ID: "n", A.HOST_NAME: "h", A.SERVICE_NAME: "s"}) == "n"
    assert node_of({A.HOST_NAME: "h", A.SERVICE_NAME: "s"}) == "h"
    assert node_of({A.SERVICE_NAME: "s"}) == "s"
    assert node_of({}) == ""


def test_clock_crossing_timestamps_and_node_clocks() -> None:
    router_attrs = {
        A.REQUEST_ID: "req-3",
        A.PREFILL_NODE: "p1",
        A.DECODE_NODE: "d1",
        A.PREFILL_SENT_NS: T0_NS + 1 * MS,
        A.DECODE_SENT_NS: T0_NS + 40 * MS,
        A.PREFILL_CLOCK_OFFSET_S: -0.05,
        A.PREFILL_CLOCK_ERROR_S: 0.0004,
        A.DECODE_CLOCK_OFFSET_S: 0.08,
        A.DECODE_CLOCK_ERROR_S: 0.0003,
    }
    # Two requests with the same estimates: node_clocks keeps one row per node.
    rows = _rows(
        {A.NODE_ID: "r1"},
        [
            span(A.SPAN_REQUEST, 1, T0_NS, T0_NS + 90 * MS, router_attrs),
            span(A.SPAN_REQUEST, 2, T0_NS + MS, T0_NS + 95 * MS, router_attrs),
        ],
    )
    assert rows.request_parts["prefill_sent"] == [T0_NS + 1 * MS] * 2
    assert rows.request_parts["decode_sent"] == [T0_NS + 40 * MS] * 2
    assert rows.request_parts["prefill_clock_offset_s"] == [-0.05] * 2
    assert rows.request_parts["decode_clock_offset_s"] == [0.08] * 2
    assert rows.node_clocks == {
        "ts": [T0_NS, T0_NS],
        "node": ["p1", "d1"],
        "offset_s": [-0.05, 0.08],
        "error_s": [0.0004, 0.0003],
        "reference_node": ["r1", "r1"],
    }
    prefill = _rows({A.NODE_ID: "p1"}, [span(A.SPAN_PREFILL, 3, T0_NS + MS, T0_NS + 30 * MS)])
    assert prefill.request_parts["prefill_start"] == [T0_NS + MS]
    assert prefill.request_parts["prefill_end"] == [T0_NS + 30 * MS]
    decode = _rows(
        {A.NODE_ID: "d1"},
        [
            span(A.SPAN_DECODE, 4, T0_NS + 41 * MS, T0_NS + 90 * MS),
            span(A.SPAN_KV_TRANSFER, 5, T0_NS + 42 * MS, T0_NS + 43 * MS),
        ],
    )
    assert decode.request_parts["decode_start"] == [T0_NS + 41 * MS, None]
    assert decode.request_parts["kv_start"] == [None, T0_NS + 42 * MS]
    assert not decode.node_clocks["ts"] and "node_clocks" not in decode.tables()


def test_no_node_clocks_row_without_a_node_or_an_estimate() -> None:
    rows = _rows(
        {A.NODE_ID: "r1"},
        [
            span(A.SPAN_REQUEST, 1, T0_NS, T0_NS + MS, {A.DECODE_CLOCK_OFFSET_S: 0.01}),
            span(A.SPAN_REQUEST, 2, T0_NS, T0_NS + MS, {A.PREFILL_NODE: "p1"}),
            span(A.SPAN_REQUEST, 3, T0_NS, T0_NS + MS, {A.PREFILL_SENT_NS: "soon"}),
        ],
    )
    assert rows.node_clocks["node"] == []
    assert rows.request_parts["decode_clock_offset_s"] == [0.01, None, None]
    assert rows.request_parts["prefill_sent"] == [None, None, None]
