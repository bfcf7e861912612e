"""The Native block encoder against ClickHouse's own decoder: any rows of every column
type the store's tables use, inserted as one block through :meth:`Store.insert`, read
back exactly as given."""

from __future__ import annotations

import itertools
from array import array
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokentrace.collector import Store
from tokentrace.collector.native import NativeTypeError, encode_block, wire_type

TABLE = "native_roundtrip"
COLUMNS = {
    "k": "UInt64",
    "ts": "DateTime64(9)",
    "s": "String",
    "lc": "LowCardinality(String)",
    "m": "Map(LowCardinality(String), String)",
    "times": "Array(Int64)",
    "counts": "Array(UInt16)",
    "pf": "Array(Nullable(UInt32))",
    "x": "SimpleAggregateFunction(max, Nullable(Float64))",
    "ns": "Nullable(String)",
    "ev": "Array(Map(LowCardinality(String), String))",
}
_KEYS = itertools.count(1)

text = st.text(max_size=300)
rows = st.lists(
    st.fixed_dictionaries(
        {
            "ts": st.integers(0, 2**62),
            "s": text,
            "lc": st.sampled_from(["decode-0", "prefill-0", ""]),
            "m": st.dictionaries(st.text(max_size=20), text, max_size=5),
            "times": st.lists(st.integers(-(2**63), 2**63 - 1), max_size=20),
            "counts": st.lists(st.integers(0, 2**16 - 1), max_size=20),
            "pf": st.lists(st.none() | st.integers(0, 2**32 - 1), max_size=20),
            "x": st.none() | st.floats(allow_nan=False),
            "ns": st.none() | text,
            "ev": st.lists(st.dictionaries(st.text(max_size=5), text, max_size=3), max_size=3),
        }
    ),
    min_size=1,
    max_size=30,
)


@pytest.fixture(scope="module")
def table(store: Store) -> str:
    cols = ", ".join(f"`{n}` {t}" for n, t in COLUMNS.items())
    store.command(
        f"CREATE TABLE IF NOT EXISTS tokentrace.{TABLE} ({cols}) ENGINE = MergeTree ORDER BY k"
    )
    return TABLE


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=rows, as_arrays=st.booleans())
def test_any_rows_come_back_as_they_were_given(
    store: Store, table: str, rows: list[dict[str, Any]], as_arrays: bool
) -> None:
    """Arrays given as ``array.array`` (as decode makes them) or as lists alike."""
    keys = [next(_KEYS) for _ in rows]
    columns: dict[str, list[Any]] = {"k": keys}
    for name in COLUMNS:
        if name != "k":
            columns[name] = [r[name] for r in rows]
    if as_arrays:
        columns["times"] = [array("q", v) for v in columns["times"]]
        columns["counts"] = [array("H", v) for v in columns["counts"]]
    store.insert(table, columns)
    got = store.query(
        f"SELECT toUnixTimestamp64Nano(ts), s, lc, m, times, counts, pf, x, ns, ev FROM {table} "
        "WHERE k IN {keys:Array(UInt64)} ORDER BY k",
        {"keys": keys},
    ).rows
    want = [
        (
            r["ts"],
            r["s"],
            r["lc"],
            r["m"],
            r["times"],
            r["counts"],
            r["pf"],
            r["x"],
            r["ns"],
            r["ev"],
        )
        for r in rows
    ]
    assert [tuple(row) for row in got] == want


def test_types_are_sent_as_clickhouse_converts_them() -> None:
    assert wire_type("LowCardinality(String)") == "String"
    assert wire_type("SimpleAggregateFunction(min, Nullable(DateTime64(9)))") == (
        "Nullable(DateTime64(9))"
    )
    assert wire_type("Map(LowCardinality(String), String)") == "Map(String, String)"
    assert wire_type("Array(Map(LowCardinality(String), String))") == ("Array(Map(String, String))")


def test_a_type_it_cannot_write_and_a_short_column_are_refused() -> None:
    with pytest.raises(NativeTypeError, match="UUID"):
        encode_block({"u": ["x"]}, {"u": "UUID"})
    with pytest.raises(ValueError, match="'b' has 1 values, 2 expected"):
        encode_block({"a": [1, 2], "b": [1]}, {"a": "UInt8", "b": "UInt8"})
