"""The DDL on a real embedded ClickHouse (chDB): idempotent, and the requests view folds
partial rows from several spans into one row per request."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokentrace.schemas import ddl_statements


def test_statements_are_validated() -> None:
    with pytest.raises(ValueError, match="database"):
        ddl_statements("drop table x")
    with pytest.raises(ValueError, match="ttl_days"):
        ddl_statements(ttl_days=0)
    clustered = ddl_statements(cluster="prod", ttl_days=7)
    assert all(" ON CLUSTER prod" in s for s in clustered)
    assert any("ReplicatedMergeTree" in s for s in clustered)
    assert any("ReplicatedAggregatingMergeTree" in s for s in clustered)
    assert any("toIntervalDay(7)" in s for s in clustered)


def test_requests_view_folds_parts(tmp_path: Path) -> None:
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path / 'ch'}")
    for _ in range(2):  # idempotent
        for statement in ddl_statements(ttl_days=30):
            client.command(statement)
    cols = [
        "trace_id",
        "request_id",
        "router_node",
        "decode_node",
        "prefill_s",
        "kv_transfer_s",
        "kv_bytes",
        "status",
        "ttft_s",
    ]
    parts = [
        ["t1", "r1", "router-0", None, None, None, None, "ok", 0.25],  # router
        ["t1", None, None, None, 0.1, None, None, None, None],  # prefill
        ["t1", None, None, "decode-1", None, 0.01, 100, "error", None],  # decode, failed
        ["t1", None, None, None, None, 0.02, 50, None, None],  # a second transfer
        ["t2", None, None, "decode-0", None, None, None, None, None],  # no router part yet
    ]
    client.insert("tokentrace.request_parts", parts, column_names=cols)
    rows = client.query("SELECT * FROM tokentrace.requests").named_results()
    rows = list(rows)
    assert len(rows) == 1  # t2 has no router part: not a request row yet
    row = rows[0]
    assert row["request_id"] == "r1" and row["decode_node"] == "decode-1"
    assert row["prefill_s"] == 0.1 and row["ttft_s"] == 0.25
    assert row["kv_transfer_s"] == pytest.approx(0.03) and row["kv_bytes"] == 150
    assert row["status"] == "error"  # an error part wins over 'ok'
