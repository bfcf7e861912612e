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


def test_requests_view_puts_cross_node_intervals_on_the_router_clock(tmp_path: Path) -> None:
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path / 'ch'}")
    for statement in ddl_statements():
        client.command(statement)
    ms = 1_000_000
    t0 = 1_700_000_000_000_000_000
    p_skew, d_skew = -50 * ms, 80 * ms  # each worker's clock minus the router's
    cols = [
        "trace_id",
        "request_id",
        "prefill_sent",
        "decode_sent",
        "prefill_clock_offset_s",
        "decode_clock_offset_s",
        "prefill_start",
        "prefill_end",
        "decode_start",
        "kv_start",
    ]
    n = None
    parts = [
        # True times on the router's clock: prefill sent at +0, received +1 ms, done +20 ms;
        # decode sent +22 ms, received +23 ms, first read +25 ms.
        ["t1", "r1", t0, t0 + 22 * ms, -0.05, 0.08, n, n, n, n],
        ["t1", n, n, n, n, n, t0 + 1 * ms + p_skew, t0 + 20 * ms + p_skew, n, n],
        ["t1", n, n, n, n, n, n, n, t0 + 23 * ms + d_skew, t0 + 25 * ms + d_skew],
    ]
    client.insert("tokentrace.request_parts", parts, column_names=cols)
    (row,) = client.query("SELECT * FROM tokentrace.requests").named_results()
    assert row["prefill_dispatch_s"] == pytest.approx(0.001)
    assert row["decode_dispatch_s"] == pytest.approx(0.001)
    assert row["prefill_to_decode_s"] == pytest.approx(0.003)
    assert row["kv_handoff_s"] == pytest.approx(0.005)
    assert (row["prefill_clock_offset_s"], row["decode_clock_offset_s"]) == (-0.05, 0.08)


def test_requests_view_has_no_handoff_when_one_worker_did_both(tmp_path: Path) -> None:
    """An aggregated request: its worker's llm.prefill span ends after its llm.decode
    span starts, and nothing crossed nodes, so the handoff intervals are NULL rather than
    negative; the router's dispatch to the worker is still measured."""
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path / 'ch'}")
    for statement in ddl_statements():
        client.command(statement)
    ms, t0, n = 1_000_000, 1_700_000_000_000_000_000, None
    cols = ["trace_id", "request_id", "prefill_node", "decode_node", "decode_sent"]
    cols += ["decode_start", "prefill_start", "prefill_end"]
    parts = [
        ["t1", "r1", "both-0", "both-0", t0, n, n, n],
        ["t1", n, n, "both-0", n, t0 + 1 * ms, n, n],
        ["t1", n, "both-0", n, n, n, t0 + 1 * ms, t0 + 9 * ms],
    ]
    client.insert("tokentrace.request_parts", parts, column_names=cols)
    (row,) = client.query("SELECT * FROM tokentrace.requests").named_results()
    assert row["prefill_to_decode_s"] is None and row["kv_handoff_s"] is None
    assert row["decode_dispatch_s"] == pytest.approx(0.001)


def test_ddl_upgrades_a_store_created_before_clock_columns(tmp_path: Path) -> None:
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path / 'ch'}")
    # The first release's request_parts and requests: today's, without the clock columns.
    clock_columns = ("_sent ", "_start ", "_end ", "_clock_offset_s ")
    first_release = []
    for statement in ddl_statements():
        if "request_parts (" in statement:
            lines = [ln for ln in statement.splitlines() if not any(c in ln for c in clock_columns)]
            statement = "\n".join(lines).replace("Nullable(String)),\n)", "Nullable(String))\n)")
        elif "VIEW tokentrace.requests" in statement:
            statement = (
                "CREATE VIEW tokentrace.requests AS SELECT trace_id FROM tokentrace.request_parts"
            )
        elif statement.startswith("ALTER"):
            continue
        first_release.append(statement)
    for statement in first_release:
        client.command(statement)
    names = client.query("SELECT name FROM system.columns WHERE table = 'request_parts'")
    assert "kv_start" not in {r[0] for r in names.result_rows}
    client.insert(
        "tokentrace.request_parts", [["old", "r0"]], column_names=["trace_id", "request_id"]
    )
    for statement in ddl_statements():
        client.command(statement)
    (row,) = client.query("SELECT * FROM tokentrace.requests").named_results()
    assert row["request_id"] == "r0" and row["kv_handoff_s"] is None


def test_the_query_user_is_granted_select_on_tokentrace_only(tmp_path: Path) -> None:
    """chDB has no users, so the statements cannot run here: ClickHouse's own parser
    reads each one, and the parse says what it grants."""
    import hashlib

    import clickhouse_connect

    from tokentrace.schemas import query_user_statements

    limits = {
        "max_execution_time": 30.0,
        "max_result_rows": 100000,
        "result_overflow_mode": "throw",
    }
    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path / 'ch'}")
    try:
        for cluster in (None, "prod"):
            statements = query_user_statements("tokentrace_query", "pw-1", limits, cluster=cluster)
            assert len(statements) == 3
            for sql in statements:
                assert "pw-1" not in sql
                client.query("SELECT formatQuery({s:String})", parameters={"s": sql})
                assert (" ON CLUSTER `prod`" in sql) == (cluster is not None)
            profile, user, grant = statements
            assert profile.startswith(
                "CREATE SETTINGS PROFILE OR REPLACE `tokentrace_query_limits`"
            )
            for part in (
                "readonly = 2 CONST",
                "max_execution_time = 30.0 MAX 30.0",
                "max_result_rows = 100000 MAX 100000",
                "result_overflow_mode = 'throw' CONST",
            ):
                assert part in profile
            assert hashlib.sha256(b"pw-1").hexdigest() in user
            assert "SETTINGS PROFILE 'tokentrace_query_limits'" in user
            assert grant.endswith("SELECT ON `tokentrace`.* TO `tokentrace_query`")
    finally:
        client.close()
    with pytest.raises(ValueError, match="user name"):
        query_user_statements("x; DROP USER default", "pw", limits)
    with pytest.raises(ValueError, match="password"):
        query_user_statements("tokentrace_query", "", limits)


def test_the_readme_shows_the_query_user_statements_the_collector_runs() -> None:
    import re

    from tokentrace.collector.query.sqlguard import QueryLimits
    from tokentrace.schemas import QUERY_USER, query_user_statements

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    shown = re.search(r"```sql\n(CREATE SETTINGS PROFILE.*?)```", readme, re.DOTALL)
    assert shown is not None
    made = query_user_statements(QUERY_USER, "x", QueryLimits().settings())
    digest = re.search(r"BY '([0-9a-f]{64})'", made[1])
    assert digest is not None
    expected = "\n".join(made).replace(digest.group(1), "<sha256 of the password, hex>")
    assert shown.group(1).strip() == expected


def test_every_table_merges_column_by_column_in_small_blocks(tmp_path: Path) -> None:
    """The merge settings that bound an embedded store's memory while it inserts reach
    every table, also one created before them (the DDL upgrades it)."""
    import clickhouse_connect

    from tokentrace.schemas.ddl import MERGE_SETTINGS, TABLES

    client = clickhouse_connect.get_client(dsn=f"chdb://{tmp_path / 'ch'}")
    client.command("CREATE DATABASE tokentrace")
    client.command(  # as a release before the settings made it
        "CREATE TABLE tokentrace.kv_transfers (ts DateTime64(9)) ENGINE = MergeTree ORDER BY ts"
    )
    for statement in ddl_statements():
        client.command(statement)
    rows = client.query(
        "SELECT name, create_table_query FROM system.tables WHERE database = 'tokentrace'"
    ).result_rows
    created = dict(rows)
    for table in TABLES:
        for name, value in MERGE_SETTINGS.items():
            assert f"{name} = {value}" in created[table], (table, name)
