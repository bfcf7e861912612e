"""The store against an embedded chDB store on a temporary path (the pipeline over it
is tested in ingest/test_pipeline.py).

chDB binds one data path per process, so the whole module shares one store.
"""

from __future__ import annotations

import pytest
from otlp_builders import T0_NS

from tokentrace.collector import (
    NsDatetime,
    Store,
    StoreError,
    open_store,
)


def test_ddl_is_idempotent(store: Store) -> None:
    from tokentrace.schemas import ddl_statements

    for statement in ddl_statements():
        store.command(statement)


def test_insert_round_trip_keeps_nanoseconds(store: Store) -> None:
    ts = [T0_NS, T0_NS + 1]
    store.insert(
        "token_span_latencies",
        {
            "ts": ts,
            "trace_id": ["rt", "rt"],
            "node": ["n", "n"],
            "token_index": [0, 1],
            "itl_s": [None, 1e-9],
            "tokens": [1, 3],
            "batch_size": [0, 2],
        },
    )
    result = store.query(
        "SELECT ts, toUnixTimestamp64Nano(ts) AS ns, itl_s, tokens FROM token_latencies "
        "WHERE trace_id = {t:String} ORDER BY ts",
        {"t": "rt"},
    )
    assert result.column_names == ("ts", "ns", "itl_s", "tokens")
    assert result.column_types[0] == "DateTime64(9)"
    assert [row[1] for row in result.rows] == ts
    first = result.rows[0][0]
    assert isinstance(first, NsDatetime) and first.ns == T0_NS
    assert first.isoformat() == "2023-11-14T22:13:20.123456789Z"
    assert [row[2] for row in result.rows] == [None, 1e-9]


def test_nullable_and_array_datetime64_convert(store: Store) -> None:
    result = store.query(
        "SELECT toNullable(fromUnixTimestamp64Nano(toInt64({n:Int64}))) AS a, "
        "[fromUnixTimestamp64Nano(toInt64({n:Int64}))] AS b, "
        "CAST(NULL, 'Nullable(DateTime64(9))') AS c",
        {"n": T0_NS + 7},
    )
    a, b, c = result.rows[0]
    assert a.ns == T0_NS + 7 and b[0].ns == T0_NS + 7 and c is None


def test_bad_sql_is_a_permanent_store_error(store: Store) -> None:
    with pytest.raises(StoreError) as info:
        store.query("SELEC 1")
    assert info.value.transient is False and info.value.code == 62
    assert "Syntax error" in str(info.value)


def test_readonly_refuses_writes(store: Store) -> None:
    with pytest.raises(StoreError, match="readonly"):
        store.query("INSERT INTO node_clocks (node) VALUES ('x')", readonly=True)
    assert store.query("SELECT 1", readonly=True).rows == [(1,)]
    # The refused write must not leave the writing session read-only.
    store.insert(
        "node_clocks",
        {
            "ts": [T0_NS],
            "node": ["x"],
            "offset_s": [0.0],
            "error_s": [0.0],
            "reference_node": ["x"],
        },
    )


def test_bad_dsn_names_it() -> None:
    with pytest.raises(ValueError, match="nowhere"):
        open_store("nowhere")
