"""The ingest pipeline as one unit, through its public interface (``consume``,
``counters``, ``start``/``shutdown``) on a real write-ahead log directory and a real
chDB store: what an export becomes in every table, packed and one span per token alike,
and that replaying the log after a crash stores nothing twice."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from otlp_builders import T0_NS, TRACE_ID, packed_and_unpacked, request, span

from tokentrace.collector import (
    DecodeError,
    Pipeline,
    PipelineConfig,
    PipelineUnavailable,
    Store,
)
from tokentrace.collector.ingest.decode import OTEL_TRACES_COLUMNS
from tokentrace.collector.ingest.wal import WalConfig, WriteAheadLog
from tokentrace.schemas import attributes as A


def test_pipeline_stores_spans_and_derived_rows(store: Store, wal: WriteAheadLog) -> None:
    pipeline = Pipeline(store, wal, PipelineConfig(flush_interval_ms=20))
    pipeline.shutdown()  # safe without start
    pipeline = Pipeline(store, wal, PipelineConfig(flush_interval_ms=20))
    pipeline.start()
    pipeline.start()
    trace_ids = [bytes([i + 1]) * 16 for i in range(8)]
    results = []

    def export(tid: bytes) -> None:
        req = request(
            {A.SERVICE_NAME: "router", A.NODE_ID: "r1"},
            [
                span(
                    A.SPAN_REQUEST,
                    1,
                    T0_NS,
                    T0_NS + 10**8,
                    {
                        A.REQUEST_ID: tid.hex()[:8],
                        A.GEN_AI_USAGE_OUTPUT_TOKENS: 3,
                        A.GEN_AI_SERVER_TTFT: 0.02,
                    },
                    trace_id=tid,
                ),
                span(A.SPAN_TOKEN, 2, T0_NS, T0_NS + 5, {A.TOKEN_INDEX: 1}, trace_id=tid),
            ],
        )
        results.append(pipeline.consume(req.SerializeToString()))

    threads = [threading.Thread(target=export, args=(tid,)) for tid in trace_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stored_spans for r in results] == [2] * 8

    with pytest.raises(DecodeError):
        pipeline.consume(b"\x0a\xff\xff")
    bad = request({}, [span("x", 1, T0_NS, T0_NS - 1, trace_id=TRACE_ID)])
    result = pipeline.consume(bad.SerializeToString())
    assert (result.stored_spans, result.rejected_spans) == (0, 1)
    assert "end_time_unix_nano" in result.error_message

    pipeline.shutdown()
    pipeline.shutdown()
    counters = pipeline.counters()
    assert {k: counters[k] for k in ("spans_received", "spans_stored", "spans_rejected")} == {
        "spans_received": 17,
        "spans_stored": 16,
        "spans_rejected": 1,
    }
    assert counters["wal_pending_records"] == counters["wal_pending_bytes"] == 0
    assert counters["store_ok"] and counters["spans_lost"] == 0
    assert counters["store_lag_s"] == 0.0 and counters["queued_exports"] == 0  # nothing waits
    inserts = {s.name: s.value for s in pipeline.insert_duration.collect()[0].samples}
    # One observation per group commit: the 8 concurrent exports took 1 to 8 of them.
    assert 1 <= inserts["tokentrace_collector_insert_duration_seconds_count"] <= 8
    assert inserts["tokentrace_collector_insert_duration_seconds_sum"] > 0
    with pytest.raises(PipelineUnavailable):
        pipeline.consume(request({}, [span("x", 1, T0_NS, T0_NS)]).SerializeToString())

    hexes = [t.hex() for t in trace_ids]
    rows = store.query(
        "SELECT trace_id, request_id, output_tokens, tpot_s FROM requests "
        "WHERE has({ids:Array(String)}, trace_id) ORDER BY trace_id",
        {"ids": hexes},
    ).rows
    assert [r[0] for r in rows] == hexes
    assert all(r[2] == 3 and r[3] == pytest.approx((0.1 - 0.02) / 2) for r in rows)
    count = store.query(
        "SELECT count() FROM otel_traces WHERE has({ids:Array(String)}, TraceId)", {"ids": hexes}
    ).rows[0][0]
    assert count == 16


def test_token_rows_come_from_the_stored_token_spans(store: Store, wal: WriteAheadLog) -> None:
    """One SQL definition (token_latencies_mv) makes a token_latencies row of every
    stored llm.token span: the emission time is the span's end, the first emission has
    no gap, a multi-token emission counts its tokens, and attributes that are missing,
    unparsable or out of range become NULL or the column's default."""
    tid = bytes([0x7E]) * 16
    ms = 1_000_000
    req = request(
        {A.SERVICE_NAME: "decode", A.NODE_ID: "d1"},
        [
            span(
                A.SPAN_TOKEN, 10, T0_NS, T0_NS + 20 * ms,
                {A.TOKEN_INDEX: 0, A.BATCH_SIZE: 4, A.STEP_PREFILL_TOKENS: 0}, trace_id=tid,
            ),
            span(
                A.SPAN_TOKEN, 11, T0_NS + 20 * ms, T0_NS + 25 * ms,
                {A.TOKEN_INDEX: 1, A.TOKEN_COUNT: 3, A.BATCH_SIZE: 4, A.STEP_PREFILL_TOKENS: 96},
                trace_id=tid,
            ),
            span(
                A.SPAN_TOKEN, 12, T0_NS + 25 * ms, T0_NS + 31 * ms, {A.TOKEN_INDEX: 4}, trace_id=tid
            ),
            span(
                A.SPAN_TOKEN, 13, T0_NS + 31 * ms, T0_NS + 32 * ms,
                {A.TOKEN_INDEX: "5.0", A.TOKEN_COUNT: 1 << 20, A.STEP_PREFILL_TOKENS: -1,
                 A.BATCH_SIZE: "many"},
                trace_id=tid,
            ),
            span(A.SPAN_DECODE, 14, T0_NS, T0_NS + 32 * ms, trace_id=tid),  # not a token row
        ],
    )  # fmt: skip
    pipeline = Pipeline(store, wal, PipelineConfig(flush_interval_ms=20))
    pipeline.start()
    try:
        assert pipeline.consume(req.SerializeToString()).stored_spans == 5
        assert pipeline.flush()
    finally:
        pipeline.shutdown()
    rows = store.query(
        "SELECT toUnixTimestamp64Nano(ts), node, token_index, itl_s, tokens, batch_size, "
        "step_prefill_tokens FROM token_latencies WHERE trace_id = {t:String} ORDER BY ts",
        {"t": tid.hex()},
    ).rows
    assert rows == [
        (T0_NS + 20 * ms, "d1", 0, None, 1, 4, 0),
        (T0_NS + 25 * ms, "d1", 1, pytest.approx(0.005), 3, 4, 96),
        (T0_NS + 31 * ms, "d1", 4, pytest.approx(0.006), 1, 0, None),
        # Reported 0 (a step with no prefill work) stays apart from not reported (NULL).
        (T0_NS + 32 * ms, "d1", 5, pytest.approx(0.001), 1, 0, None),
    ]


@pytest.mark.parametrize("step_prefill", [True, False], ids=["v2", "v1"])
def test_packed_tokens_land_as_the_unpacked_mode_lands_them(
    store: Store, wal: WriteAheadLog, step_prefill: bool
) -> None:
    """ClickHouse's expansion of a packed decode span writes the otel_traces and
    token_latencies rows the collector writes for the same emissions sent one span each,
    and the same spans it forwards: with each step's prefill count (packed version 2),
    or, from an emitter that cannot know it (version 1), with none (NULL)."""
    from tokentrace.collector.ingest.decode import decode_request
    from tokentrace.collector.ingest.expand import expanded_request

    unpacked_req, packed_req = packed_and_unpacked(step_prefill)
    pipeline = Pipeline(store, wal, PipelineConfig(flush_interval_ms=20))
    pipeline.start()
    try:
        assert pipeline.consume(unpacked_req.SerializeToString()).stored_spans == 6
        assert pipeline.consume(packed_req.SerializeToString()).stored_spans == 1
        assert pipeline.flush()
        assert pipeline.counters()["spans_stored"] == 12
    finally:
        pipeline.shutdown()
    unpacked_tid = unpacked_req.resource_spans[0].scope_spans[0].spans[0].trace_id.hex()
    packed_tid = packed_req.resource_spans[0].scope_spans[0].spans[0].trace_id.hex()

    columns = [c for c in OTEL_TRACES_COLUMNS]

    def spans(tid: str) -> list[dict]:
        res = store.query(
            f"SELECT {', '.join(columns)} FROM otel_traces WHERE TraceId = {{t:String}} "
            "ORDER BY SpanName, Timestamp",
            {"t": tid},
        )
        return [dict(zip(res.column_names, r, strict=True)) for r in res.rows]

    def comparable(rows: list[dict]) -> list[dict]:
        out = []
        for r in rows:
            r = {k: v for k, v in r.items() if k not in ("TraceId", "SpanId", "ParentSpanId")}
            if r["SpanName"] == A.SPAN_DECODE:  # the two decode spans started apart
                r.pop("Timestamp"), r.pop("Duration")
            out.append(r)
        return out

    unpacked, packed = spans(unpacked_tid), spans(packed_tid)
    assert len(packed) == 6
    assert comparable(packed) == comparable(unpacked)

    # What is forwarded for the packed export is exactly what ClickHouse stored.
    forwarded = decode_request(expanded_request(packed_req)).otel_spans_columns()
    stored = {name: [r[name] for r in packed] for name in columns}
    key = sorted(range(6), key=lambda i: (forwarded["SpanName"][i], forwarded["Timestamp"][i]))
    for name in ("SpanId", "ParentSpanId", "Timestamp", "Duration", "SpanAttributes"):
        assert [forwarded[name][i] for i in key] == [
            v if name != "Timestamp" else v.ns for v in stored[name]
        ], name

    token_cols = (
        "token_index, itl_s, tokens, batch_size, node, toUnixTimestamp64Nano(ts), "
        "step_prefill_tokens"
    )
    rows = {
        tid: store.query(
            f"SELECT {token_cols} FROM token_latencies WHERE trace_id = {{t:String}} "
            "ORDER BY token_index",
            {"t": tid},
        ).rows
        for tid in (unpacked_tid, packed_tid)
    }
    assert rows[packed_tid] == rows[unpacked_tid]
    assert [r[0] for r in rows[packed_tid]] == [0, 1, 2, 5, 6]
    expected = [0, 40, 0, 120, 0] if step_prefill else [None] * 5
    assert [r[6] for r in rows[packed_tid]] == expected


def test_a_chat_role_chunk_is_the_first_emission_in_both_modes(
    store: Store, wal: WriteAheadLog
) -> None:
    """A chat stream's role chunk is an emission of 0 tokens right before the first
    output's own chunk: it is the one without a gap, and the next emission (token index
    0 as well) has one, whether the emissions come packed or one span each."""
    unpacked_req, packed_req = packed_and_unpacked(counts=(0, 1, 2))
    pipeline = Pipeline(store, wal, PipelineConfig(flush_interval_ms=20))
    pipeline.start()
    try:
        pipeline.consume(unpacked_req.SerializeToString())
        pipeline.consume(packed_req.SerializeToString())
        assert pipeline.flush()
    finally:
        pipeline.shutdown()
    rows = {}
    for req in (unpacked_req, packed_req):
        tid = req.resource_spans[0].scope_spans[0].spans[0].trace_id.hex()
        rows[tid] = store.query(
            "SELECT token_index, itl_s IS NULL, tokens FROM token_latencies "
            "WHERE trace_id = {t:String} ORDER BY ts",
            {"t": tid},
        ).rows
    unpacked, packed = rows.values()
    assert packed == unpacked == [(0, True, 0), (0, False, 1), (1, False, 2)]


def test_log_records_replayed_after_a_crash_are_stored_exactly_once(
    store: Store, tmp_path: Path
) -> None:
    """Records a crashed collector left in its log are inserted at the next start; after
    a crash that lost the checkpoint they are inserted again, and ClickHouse drops the
    repeat in every table (the MV-filled ones too) by the records' insert tokens."""
    import time

    from tokentrace.collector.ingest.logrecord import encode_record, export_digest

    unpacked_req, packed_req = packed_and_unpacked()
    trace_ids = [
        req.resource_spans[0].scope_spans[0].spans[0].trace_id.hex()
        for req in (unpacked_req, packed_req)
    ]
    directory = tmp_path / "wal"
    log = WriteAheadLog(WalConfig(str(directory)))
    for req in (unpacked_req, packed_req):
        wire = req.SerializeToString()
        log.append(encode_record(time.time_ns(), [(export_digest(wire), wire)]))
    log.close()

    tables = {
        "otel_traces": "TraceId",
        "otel_traces_trace_id_ts": "TraceId",
        "token_latencies": "trace_id",
        "request_parts": "trace_id",
    }

    def counts() -> dict[str, int]:
        return {
            table: store.query(
                f"SELECT count() FROM {table} WHERE has({{ids:Array(String)}}, {column})",
                {"ids": trace_ids},
            ).rows[0][0]
            for table, column in tables.items()
        }

    def run() -> dict[str, int]:
        log = WriteAheadLog(WalConfig(str(directory)))
        pipeline = Pipeline(store, log, PipelineConfig(flush_interval_ms=5))
        pipeline.start()
        pipeline.shutdown()
        counters = pipeline.counters()
        log.close()
        return counters

    first = run()
    assert first["wal_replayed_records"] == 2 and first["spans_stored"] == 12
    stored = counts()
    assert stored["otel_traces"] == 12 and stored["token_latencies"] == 10
    assert stored["otel_traces_trace_id_ts"] > 0 and stored["request_parts"] > 0

    (directory / "CHECKPOINT").write_text("0\n")  # as if it crashed before writing it
    again = run()
    # The last block it began is inserted again (and dropped by ClickHouse); the records
    # before it were stored before it was begun.
    assert (directory / "BLOCK").read_text().split() == ["2", "2"]
    assert again["wal_replayed_records"] == 1
    assert counts() == stored
    assert run()["wal_replayed_records"] == 0

    # A sender that never got its acknowledgement sends the export again after the
    # restart: it is recognised, acknowledged, and not stored twice.
    log = WriteAheadLog(WalConfig(str(directory)))
    pipeline = Pipeline(store, log, PipelineConfig(flush_interval_ms=5))
    pipeline.start()
    try:
        assert pipeline.consume(packed_req.SerializeToString()).stored_spans == 1
        assert pipeline.counters()["exports_deduplicated"] == 1
    finally:
        pipeline.shutdown()
        log.close()
    assert counts() == stored


def test_flush_waits_for_what_was_acknowledged_and_not_for_an_older_log(
    store: Store, wal: WriteAheadLog
) -> None:
    """After an export's answer, ``flush`` returns only once its rows are queryable; on a
    log whose records were all stored by an earlier run it returns at once."""
    pipeline = Pipeline(store, wal, PipelineConfig(flush_interval_ms=5, insert_interval_ms=60_000))
    pipeline.start()
    try:
        tid = bytes([0x5A]) * 16
        req = request({}, [span("flushed", 1, T0_NS, T0_NS + 10, trace_id=tid)])
        assert pipeline.consume(req.SerializeToString()).stored_spans == 1
        # The block would wait a minute: the flush inserts it now.
        assert pipeline.flush(timeout_s=30)
        rows = store.query(
            "SELECT count() FROM otel_traces WHERE TraceId = {t:String}", {"t": tid.hex()}
        ).rows
        assert rows == [(1,)]
    finally:
        pipeline.shutdown()
    again = Pipeline(store, wal, PipelineConfig(insert_interval_ms=60_000))
    again.start()
    try:
        assert again.flush(timeout_s=0)  # nothing to wait for: answered at once
    finally:
        again.shutdown()
