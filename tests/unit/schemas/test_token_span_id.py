"""A packed emission's span id has one definition: the collector's Python (forwarding,
the one-span-per-token path's tests) and the ClickHouse view that expands packed rows
compute the same id for every decode span and emission, the all-zero case included."""

from __future__ import annotations

import chdb
import pytest

from tokentrace.schemas.packed import token_span_id, token_span_id_sql

GOLDEN = 0x9E3779B97F4A7C15
IDS = [
    bytes.fromhex("0000000000000001"),
    bytes.fromhex("9e3779b97f4a7c15"),  # emission 0 of this one XORs to zero: id 1
    bytes.fromhex("ffffffffffffffff"),
    bytes.fromhex("5a17c0de12345678"),
]


@pytest.mark.parametrize("decode_id", IDS, ids=lambda b: b.hex())
def test_python_and_the_view_derive_the_same_ids(decode_id: bytes) -> None:
    indices = [0, 1, 2, 7, 1000, 65_535]
    numbers = ", ".join(str(i + 1) for i in indices)
    sql = (
        f"SELECT {token_span_id_sql('d', 'i')} FROM (SELECT "
        f"reinterpretAsUInt64(reverse(unhex('{decode_id.hex()}'))) AS d, "
        f"arrayJoin([{numbers}]) AS i)"
    )
    got = chdb.query(sql, "TabSeparated").data().split()
    assert got == [token_span_id(decode_id, i).hex() for i in indices]


def test_ids_are_never_zero_and_differ_per_emission() -> None:
    decode_id = GOLDEN.to_bytes(8, "big")
    assert token_span_id(decode_id, 0) == (1).to_bytes(8, "big")
    ids = {token_span_id(IDS[3], i) for i in range(10_000)}
    assert len(ids) == 10_000
