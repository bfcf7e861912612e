"""Token emissions stored as arrays, read through views: the ``otel_traces`` and
``token_latencies`` rows are exactly those the release before stored (one row per
token, expanded on insert), and a store made by that release is upgraded in place.

``ddl_release_3.sql`` is that release's DDL, as its ``ddl_statements()`` printed it.
"""

from __future__ import annotations

import itertools
import random
import re
from array import array
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from tokentrace.collector.ingest.decode import SpanBatch, decode_request, decode_wire
from tokentrace.collector.native import encode_block
from tokentrace.schemas import attributes as A
from tokentrace.schemas import ddl_statements, upgrade_statements
from tokentrace.schemas.packed import encode_packed

RELEASE_3 = Path(__file__).with_name("ddl_release_3.sql")
NOW_NS = 1_760_000_000_000_000_000
# The release before: its packed_tokens columns, and today's they are filled from.
OLD_PACKED = {
    "TraceId": "trace_id",
    "DecodeSpanId": "decode_span_id",
    "start_ns": "decode_start",
    "ServiceName": "service_name",
    "ResourceAttributes": "resource_attributes",
    "ScopeName": "scope_name",
    "ScopeVersion": "scope_version",
    "node": "node",
    "times": "times",
    "steps": "steps",
    "counts": "counts",
    "batch_sizes": "batch_sizes",
    "prefill_tokens": "prefill_tokens",
}


def release_3_statements(database: str) -> list[str]:
    # The database name, not the attribute names ('tokentrace.node.id', ...).
    text = re.sub(r"(?<=[\s(])tokentrace\b", database, RELEASE_3.read_text())
    return [s.strip() for s in text.split(";\n") if s.strip().rstrip(";")]


def apply_schema(client: Any, database: str = "tokentrace") -> None:
    """What the collector's store runs on connecting."""
    engines = dict(
        client.query(
            "SELECT name, engine FROM system.tables WHERE database = {db:String}",
            parameters={"db": database},
        ).result_rows
    )
    for statement in upgrade_statements(engines, database) + ddl_statements(database):
        client.command(statement)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One chDB with today's schema in ``tokentrace`` and release 3's in ``old``."""
    import clickhouse_connect

    path = tmp_path_factory.mktemp("token-storage") / "ch"
    c = clickhouse_connect.get_client(dsn=f"chdb://{path}")
    apply_schema(c)
    for statement in release_3_statements("old"):
        c.command(statement)
    yield c
    c.close()


def _kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def decode_spans_request(decodes: list[dict[str, Any]]) -> ExportTraceServiceRequest:
    """One decode node's export: a packed llm.decode span per entry of ``decodes``."""
    rs = ResourceSpans()
    for key, value in ((A.SERVICE_NAME, "tokentrace-decode"), (A.NODE_ID, "decode-7")):
        rs.resource.attributes.append(_kv(key, value))
    scope = ScopeSpans()
    scope.scope.name, scope.scope.version = "tokentrace", "0.1"
    for d in decodes:
        n = len(d["gaps"])
        times = array("q", [d["first_start"]])
        for gap in d["gaps"]:
            times.append(times[-1] + gap)
        packed = encode_packed(
            times,
            array("q", [d["step0"] + k for k in range(n)]),
            array("H", d["counts"]),
            array("H", d["batch"]),
            None if d["v1"] else array("I", d["prefill"]),
        )
        span = Span(
            trace_id=d["trace_id"],
            span_id=d["span_id"],
            name=A.SPAN_DECODE,
            kind=Span.SPAN_KIND_SERVER,
            start_time_unix_nano=d["start"],
            end_time_unix_nano=d["start"] + max(0, times[-1]) + 1000,
        )
        span.attributes.append(_kv(A.TOKEN_PACKED, packed))
        scope.spans.append(span)
    rs.scope_spans.append(scope)
    request = ExportTraceServiceRequest()
    request.resource_spans.append(rs)
    return request


def store_both_ways(client: Any, batch: SpanBatch) -> None:
    """The batch as the collector stores it today, and as release 3 did."""
    columns = batch.otel_spans_columns()
    names = list(columns)
    for table in ("tokentrace.otel_spans", "old.otel_traces"):
        client.insert(
            table, [list(columns[n]) for n in names], column_names=names, column_oriented=True
        )
    packed = batch.packed
    client.insert(
        "tokentrace.token_emissions",
        [list(packed[n]) for n in packed],
        column_names=list(packed),
        column_oriented=True,
    )
    client.insert(
        "old.packed_tokens",
        [list(packed[new]) for new in OLD_PACKED.values()],
        column_names=list(OLD_PACKED),
        column_oriented=True,
    )


def differences(client: Any, table: str, trace_ids: list[str]) -> tuple[int, int, int, int]:
    """Rows of ``table`` for ``trace_ids`` only today's has, only release 3's has, and
    the row counts of each."""
    key = "TraceId" if table == "otel_traces" else "trace_id"
    where = f"WHERE {key} IN {{ids:Array(String)}}"
    params = {"ids": trace_ids}

    def one(sql: str) -> int:
        return int(client.query(sql, parameters=params).result_rows[0][0])

    new, old = f"SELECT * FROM tokentrace.{table} {where}", f"SELECT * FROM old.{table} {where}"
    return (
        one(f"SELECT count() FROM ({new} EXCEPT ALL {old})"),
        one(f"SELECT count() FROM ({old} EXCEPT ALL {new})"),
        one(f"SELECT count() FROM ({new})"),
        one(f"SELECT count() FROM ({old})"),
    )


_RUNS = itertools.count(1)

emissions = st.integers(min_value=0, max_value=40).flatmap(
    lambda n: st.fixed_dictionaries(
        {
            "gaps": st.lists(st.integers(0, 10**9), min_size=n, max_size=n),
            "counts": st.lists(st.integers(0, 65_535), min_size=n, max_size=n),
            "batch": st.lists(st.integers(0, 65_535), min_size=n, max_size=n),
            "prefill": st.lists(st.integers(0, 2**32 - 1), min_size=n, max_size=n),
            "v1": st.booleans(),
            "first_start": st.integers(-(10**6), 10**9),
            "step0": st.integers(0, 2**40),
        }
    )
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(decodes=st.lists(emissions, min_size=1, max_size=4), seed=st.integers(0, 2**32))
def test_views_give_the_rows_release_3_stored_for_the_same_emissions(
    client: Any, decodes: list[dict[str, Any]], seed: int
) -> None:
    """Any packed emissions (empty ones, chat role chunks of 0 tokens, version 1 payloads
    without prefill counts, a first token span starting before its decode span, counts
    at their limits): ``otel_traces`` and ``token_latencies`` read the same rows, as
    multisets, as release 3 stored by expanding them on insert."""
    rng = random.Random(seed)
    run = next(_RUNS)  # hypothesis repeats examples: each stores under fresh ids
    for k, d in enumerate(decodes):
        d["trace_id"] = run.to_bytes(4, "big") + rng.randbytes(12)
        d["span_id"] = rng.randbytes(8)
        d["start"] = NOW_NS - 3600 * 10**9 + k * 10**9
    batch = decode_request(decode_spans_request(decodes), now_ns=NOW_NS)
    assert batch.rejected_spans == 0, batch.errors
    store_both_ways(client, batch)
    ids = [d["trace_id"].hex() for d in decodes]
    for table in ("otel_traces", "token_latencies"):
        only_new, only_old, new, old = differences(client, table, ids)
        assert (only_new, only_old) == (0, 0), table
        assert new == old
    tokens = sum(len(d["gaps"]) for d in decodes)
    assert differences(client, "token_latencies", ids)[2] == tokens
    ts = (
        "SELECT TraceId, min(Start), max(End) FROM {db}.otel_traces_trace_id_ts "
        "WHERE TraceId IN {{ids:Array(String)}} GROUP BY TraceId ORDER BY TraceId"
    )
    assert (
        client.query(ts.format(db="tokentrace"), parameters={"ids": ids}).result_rows
        == client.query(ts.format(db="old"), parameters={"ids": ids}).result_rows
    )


def test_a_store_made_by_release_3_is_upgraded_with_its_rows(client: Any) -> None:
    """Release 3's tables, with spans, a packed decode span (expanded into stored token
    spans and rows, as it did) and a token row of an older emitter: after the upgrade
    ``otel_traces`` and ``token_latencies`` are views that still read every one of those
    rows, the old expansion runs no more, and new packed emissions are stored as arrays
    and read through the views beside the old rows. Running it again changes nothing."""
    c, db = client, "upgraded"
    for statement in release_3_statements(db):
        c.command(statement)
    decodes = [
        {
            "gaps": [3, 4],
            "counts": [1, 1],
            "batch": [2, 2],
            "prefill": [0, 0],
            "v1": False,
            "first_start": 10,
            "step0": 5,
            "trace_id": bytes([1]) * 16,
            "span_id": bytes([2]) * 8,
            "start": NOW_NS - 10**12,
        }
    ]
    old = decode_request(decode_spans_request(decodes), now_ns=NOW_NS)
    columns = old.otel_spans_columns()
    c.insert(
        f"{db}.otel_traces",
        [list(v) for v in columns.values()],
        column_names=list(columns),
        column_oriented=True,
    )
    c.insert(
        f"{db}.packed_tokens",
        [list(old.packed[new]) for new in OLD_PACKED.values()],
        column_names=list(OLD_PACKED),
        column_oriented=True,
    )
    before = {
        t: sorted(map(str, c.query(f"SELECT * FROM {db}.{t}").result_rows))
        for t in ("otel_traces", "token_latencies", "otel_traces_trace_id_ts")
    }
    assert len(before["otel_traces"]) == 3 and len(before["token_latencies"]) == 2
    for _ in range(2):
        apply_schema(c, db)
    engines = dict(
        c.query(f"SELECT name, engine FROM system.tables WHERE database = '{db}'").result_rows
    )
    assert engines["otel_traces"] == engines["token_latencies"] == "View"
    assert engines["otel_spans"] == engines["token_span_latencies"] == "MergeTree"
    assert "packed_tokens" not in engines
    assert {n for n in engines if n.endswith("_mv")} == {
        "otel_traces_trace_id_ts_mv",
        "token_emissions_trace_id_ts_mv",
        "token_spans_trace_id_ts_mv",
        "token_latencies_mv",
        "itl_by_minute_spans_mv",
        "itl_by_minute_emissions_mv",
        "itl_by_minute_token_spans_mv",
    }
    after = {t: sorted(map(str, c.query(f"SELECT * FROM {db}.{t}").result_rows)) for t in before}
    assert after == before
    decodes[0].update(trace_id=bytes([3]) * 16, span_id=bytes([4]) * 8)
    new = decode_request(decode_spans_request(decodes), now_ns=NOW_NS)
    store = {"otel_spans": new.otel_spans_columns(), "token_emissions": new.packed}
    for table, cols in store.items():
        c.insert(
            f"{db}.{table}",
            [list(v) for v in cols.values()],
            column_names=list(cols),
            column_oriented=True,
        )
    rows = c.query(
        f"SELECT trace_id, count(), countIf(itl_s IS NULL) FROM {db}.token_latencies "
        "GROUP BY trace_id ORDER BY trace_id"
    ).result_rows
    assert rows == [("01" * 16, 2, 1), ("03" * 16, 2, 1)]
    stored = c.query(f"SELECT count() FROM {db}.otel_spans").result_rows[0][0]
    assert stored == 3 + 1  # the old expanded spans, and the new decode span alone
    assert c.query(f"SELECT count() FROM {db}.otel_traces").result_rows[0][0] == 6


# -- token spans stored typed ------------------------------------------------------


def insert_native(client: Any, table: str, columns: dict[str, Any]) -> None:
    """Insert as the collector's store does: one Native block, the table's own types."""
    db, name = table.split(".")
    types = dict(
        client.query(
            "SELECT name, type FROM system.columns WHERE database = {db:String} "
            "AND table = {t:String}",
            parameters={"db": db, "t": name},
        ).result_rows
    )
    client.raw_insert(
        table,
        column_names=list(columns),
        insert_block=encode_block(columns, types),
        fmt="Native",
    )


@pytest.fixture(scope="module")
def plain(client: Any) -> str:
    """A second database with today's schema, where every token span is stored as a
    span (what decode_request, or a collector before token_spans, stores)."""
    apply_schema(client, "plain")
    return "plain"


TOKEN_KEYS = (A.EMISSION_INDEX, A.TOKEN_INDEX, A.TOKEN_COUNT, A.ENGINE_STEP, A.BATCH_SIZE)
INT64 = st.integers(-(2**63), 2**63 - 1)
token_attribute_values = st.tuples(  # in TOKEN_KEYS order, as the emitters send them
    st.one_of(st.integers(0, 3), INT64),
    st.one_of(st.integers(0, 10), INT64),
    st.one_of(st.integers(0, 3), st.integers(-5, 2**17)),
    INT64,
    st.one_of(st.integers(0, 64), st.integers(-5, 2**17)),
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    spans=st.lists(
        st.tuples(
            token_attribute_values,
            st.one_of(st.none(), st.integers(-5, 2**33)),  # prefill, or none
            st.integers(0, 10**9),  # duration
        ),
        min_size=1,
        max_size=30,
    ),
    seed=st.integers(0, 2**32),
)
def test_token_spans_read_back_as_the_spans_they_came_from(
    client: Any, plain: str, spans: list[tuple[tuple[int, ...], int | None, int]], seed: int
) -> None:
    """Canonical llm.token spans with any integer values (first emissions, chat role
    chunks of 0 tokens, negatives and values past every column's range, with and without
    prefill counts), stored as token_spans rows, read through ``otel_traces``,
    ``token_latencies``, the trace-id lookup and the per-minute ITL sketch exactly as
    the same spans stored as spans."""
    rng = random.Random(seed)
    run = next(_RUNS)
    node = f"decode-{run}"
    trace_id = run.to_bytes(4, "big") + rng.randbytes(12)
    rs = ResourceSpans()
    for key, value in ((A.SERVICE_NAME, "tokentrace-decode"), (A.NODE_ID, node)):
        rs.resource.attributes.append(_kv(key, value))
    scope = ScopeSpans()
    scope.scope.name, scope.scope.version = "tokentrace", "0.1"
    start = NOW_NS - 3600 * 10**9
    for values, prefill, duration in spans:
        span = Span(
            trace_id=trace_id,
            span_id=rng.randbytes(7) + b"\x01",
            parent_span_id=b"\x0d" * 8,
            name=A.SPAN_TOKEN,
            kind=Span.SPAN_KIND_INTERNAL,
            start_time_unix_nano=start,
            end_time_unix_nano=start + duration,
        )
        items = list(zip(TOKEN_KEYS, values, strict=True))
        if prefill is not None:
            items.append((A.STEP_PREFILL_TOKENS, prefill))
        span.attributes.extend(_kv(k, v) for k, v in items)
        scope.spans.append(span)
        start += duration
    rs.scope_spans.append(scope)
    request = ExportTraceServiceRequest()
    request.resource_spans.append(rs)
    wire = request.SerializeToString()

    typed = decode_wire(wire, now_ns=NOW_NS)
    assert typed.tokens.rows == len(spans) and len(typed) == 0
    resources = typed.tokens.resources()
    client.insert(
        "tokentrace.token_span_resources",
        list(resources.values()),
        column_names=list(resources),
        column_oriented=True,
    )
    insert_native(client, "tokentrace.token_spans", typed.tokens.columns())
    as_spans = decode_request(request, now_ns=NOW_NS)
    assert len(as_spans) == len(spans)
    insert_native(client, f"{plain}.otel_spans", dict(as_spans.otel_spans_columns()))

    ids = [trace_id.hex()]
    for table in ("otel_traces", "token_latencies"):
        sql = differences_sql(table, plain)
        counts = [int(client.query(q, parameters={"ids": ids}).result_rows[0][0]) for q in sql]
        assert counts[:2] == [0, 0], table
        assert counts[2] == counts[3] == len(spans)
    ts = (
        "SELECT TraceId, min(Start), max(End) FROM {db}.otel_traces_trace_id_ts "
        "WHERE TraceId IN {{ids:Array(String)}} GROUP BY TraceId"
    )
    itl = (
        "SELECT sum(gaps), quantilesDDMerge(0.001, 0.5, 0.99)(itl) FROM {db}.itl_by_minute "
        "WHERE node = {{node:String}}"
    )
    for sql in (ts, itl):
        params = {"ids": ids, "node": node}
        # as text: a node with no gaps has NaN percentiles, never equal to themselves
        assert str(client.query(sql.format(db="tokentrace"), parameters=params).result_rows) == (
            str(client.query(sql.format(db=plain), parameters=params).result_rows)
        )


def differences_sql(table: str, other: str) -> list[str]:
    """Counts of rows for the trace ids only ``tokentrace`` has, only ``other`` has, and
    of each."""
    key = "TraceId" if table == "otel_traces" else "trace_id"
    where = f"WHERE {key} IN {{ids:Array(String)}}"
    new, old = f"SELECT * FROM tokentrace.{table} {where}", f"SELECT * FROM {other}.{table} {where}"
    return [
        f"SELECT count() FROM ({new} EXCEPT ALL {old})",
        f"SELECT count() FROM ({old} EXCEPT ALL {new})",
        f"SELECT count() FROM ({new})",
        f"SELECT count() FROM ({old})",
    ]
