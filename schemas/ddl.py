"""ClickHouse DDL for tokentrace's database, single node or cluster.

``otel_traces`` and its trace-id lookup table keep the OpenTelemetry Collector
ClickHouse exporter's layout column for column, so Grafana's trace view and the Go
collector's exporter work against them unchanged. One setting differs: granules of 1024
rows instead of 8192. A trace's spans sit in a handful of granules (one per service and
span name), so a trace lookup decompresses an eighth of the rows: 14 instead of 29 ms
with 2 million spans stored (bench/query.py).

A request's row is assembled from spans of several nodes that reach the collector in
any order (the router's ``llm.request``, the prefill worker's ``llm.prefill``, the
decode worker's ``llm.decode`` and ``llm.kv_transfer``). Each span inserts a partial
row into ``request_parts`` (an AggregatingMergeTree keyed by trace id whose columns
ignore NULLs when merged) and the ``requests`` view folds the parts into one row per
request. No join state lives in the collector, so arrival order and collector
restarts do not matter.

Cross-node intervals (router dispatch → worker arrival, prefill done → decode start,
prefill done → KV read start) subtract timestamps taken on two clocks. Each part keeps
its timestamps on its own node's clock and the router's span brings its estimate of
each worker's clock offset, so the view puts both ends on the router's clock before
subtracting: a request's row is right whichever of its spans arrived first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from tokentrace.schemas import attributes as A
from tokentrace.schemas.attributes import node_sql
from tokentrace.schemas.packed import token_span_id_sql

DATABASE = "tokentrace"
#: Insert deduplication tokens a table remembers: far more than the inserts that can be
#: in flight between a write-ahead log record's insert and its checkpoint.
DEDUP_WINDOW_BLOCKS = 1000

_OTEL_TRACES = """
CREATE TABLE IF NOT EXISTS {db}.otel_traces{on_cluster} (
    Timestamp DateTime64(9) CODEC(Delta, ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1
) ENGINE = {engine}
PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp))
{ttl}SETTINGS index_granularity = 1024, ttl_only_drop_parts = 1
"""

_TRACE_ID_TS = """
CREATE TABLE IF NOT EXISTS {db}.otel_traces_trace_id_ts{on_cluster} (
    TraceId String CODEC(ZSTD(1)),
    Start DateTime CODEC(Delta, ZSTD(1)),
    End DateTime CODEC(Delta, ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = {engine}
PARTITION BY toDate(Start)
ORDER BY (TraceId, Start)
{ttl_start}SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1
"""

_TRACE_ID_TS_MV = """
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.otel_traces_trace_id_ts_mv{on_cluster}
TO {db}.otel_traces_trace_id_ts
AS SELECT
    TraceId,
    min(Timestamp) AS Start,
    max(Timestamp) AS End
FROM {db}.otel_traces
WHERE TraceId != ''
GROUP BY TraceId
"""

# Every value column ignores NULL when parts merge, so each span contributes only the
# columns it knows; `kv_transfer_s`/`kv_bytes` add up over a request's transfers;
# `status` takes the minimum so that 'error' (< 'ok') wins over 'ok'. The columns
# after `status` are the clock-crossing timestamps, each on its own node's clock, and
# the router's offset estimates: they were added after the first release, so
# `_REQUEST_PARTS_ADD` brings older tables up to date.
_REQUEST_PARTS = """
CREATE TABLE IF NOT EXISTS {db}.request_parts{on_cluster} (
    trace_id String,
    ts SimpleAggregateFunction(min, Nullable(DateTime64(9))),
    request_id SimpleAggregateFunction(max, Nullable(String)),
    model SimpleAggregateFunction(max, Nullable(String)),
    router_node SimpleAggregateFunction(max, Nullable(String)),
    prefill_node SimpleAggregateFunction(max, Nullable(String)),
    decode_node SimpleAggregateFunction(max, Nullable(String)),
    input_tokens SimpleAggregateFunction(max, Nullable(UInt32)),
    output_tokens SimpleAggregateFunction(max, Nullable(UInt32)),
    ttft_s SimpleAggregateFunction(max, Nullable(Float64)),
    e2e_s SimpleAggregateFunction(max, Nullable(Float64)),
    tpot_s SimpleAggregateFunction(max, Nullable(Float64)),
    prefill_s SimpleAggregateFunction(max, Nullable(Float64)),
    kv_transfer_s SimpleAggregateFunction(sum, Nullable(Float64)),
    kv_bytes SimpleAggregateFunction(sum, Nullable(UInt64)),
    status SimpleAggregateFunction(min, Nullable(String)),
{clock_columns}
) ENGINE = {agg_engine}
ORDER BY trace_id
SETTINGS index_granularity = 8192
"""

_CLOCK_COLUMNS = (
    ("prefill_sent", "min, Nullable(DateTime64(9))"),  # router clock
    ("decode_sent", "min, Nullable(DateTime64(9))"),  # router clock
    ("prefill_start", "min, Nullable(DateTime64(9))"),  # prefill node clock
    ("prefill_end", "max, Nullable(DateTime64(9))"),  # prefill node clock
    ("decode_start", "min, Nullable(DateTime64(9))"),  # decode node clock
    ("kv_start", "min, Nullable(DateTime64(9))"),  # decode node clock: first read posted
    ("prefill_clock_offset_s", "max, Nullable(Float64)"),  # prefill clock - router clock
    ("decode_clock_offset_s", "max, Nullable(Float64)"),  # decode clock - router clock
)

_REQUEST_PARTS_ADD = """
ALTER TABLE {db}.request_parts{on_cluster}
{add_clock_columns}
"""

# Replaced on every start, so a store created by an older version gets the new columns.
# A clock offset the router did not report counts as 0: the interval is then as the
# two clocks tell it.
_REQUESTS_VIEW = """
CREATE OR REPLACE VIEW {db}.requests{on_cluster} AS
SELECT
    ts, trace_id, request_id, model, router_node, prefill_node, decode_node,
    input_tokens, output_tokens, ttft_s, e2e_s, tpot_s, prefill_s, kv_transfer_s,
    kv_bytes, status,
    (p_start - p_sent) / 1e9 - ifNull(p_off, 0) AS prefill_dispatch_s,
    (d_start - d_sent) / 1e9 - ifNull(d_off, 0) AS decode_dispatch_s,
    -- A worker that prefilled and decoded the request itself hands nothing over.
    if(prefill_node = decode_node, NULL,
        (d_start - p_end) / 1e9 - (ifNull(d_off, 0) - ifNull(p_off, 0))) AS prefill_to_decode_s,
    if(prefill_node = decode_node, NULL,
        (kv_first - p_end) / 1e9 - (ifNull(d_off, 0) - ifNull(p_off, 0))) AS kv_handoff_s,
    p_off AS prefill_clock_offset_s,
    d_off AS decode_clock_offset_s
FROM (
SELECT
    min(ts) AS ts,
    trace_id,
    max(request_id) AS request_id,
    max(model) AS model,
    max(router_node) AS router_node,
    max(prefill_node) AS prefill_node,
    max(decode_node) AS decode_node,
    max(input_tokens) AS input_tokens,
    max(output_tokens) AS output_tokens,
    max(ttft_s) AS ttft_s,
    max(e2e_s) AS e2e_s,
    max(tpot_s) AS tpot_s,
    max(prefill_s) AS prefill_s,
    sum(kv_transfer_s) AS kv_transfer_s,
    sum(kv_bytes) AS kv_bytes,
    min(status) AS status,
    toUnixTimestamp64Nano(min(prefill_sent)) AS p_sent,
    toUnixTimestamp64Nano(min(decode_sent)) AS d_sent,
    toUnixTimestamp64Nano(min(prefill_start)) AS p_start,
    toUnixTimestamp64Nano(max(prefill_end)) AS p_end,
    toUnixTimestamp64Nano(min(decode_start)) AS d_start,
    toUnixTimestamp64Nano(min(kv_start)) AS kv_first,
    max(prefill_clock_offset_s) AS p_off,
    max(decode_clock_offset_s) AS d_off
FROM {db}.request_parts
GROUP BY trace_id
HAVING request_id IS NOT NULL
)
"""

_TOKEN_LATENCIES = """
CREATE TABLE IF NOT EXISTS {db}.token_latencies{on_cluster} (
    ts DateTime64(9) CODEC(Delta, ZSTD(1)),
    trace_id String CODEC(ZSTD(1)),
    node LowCardinality(String),
    token_index UInt32,
    itl_s Nullable(Float64),
    tokens UInt16,
    batch_size UInt16,
    step_prefill_tokens Nullable(UInt32)
) ENGINE = {engine}
PARTITION BY toDate(ts)
ORDER BY (node, ts)
{ttl_ts}SETTINGS index_granularity = 8192
"""

# Prompt tokens the emission's engine step also prefilled (piggy-backed prefill on a
# worker doing both; 0 on a disaggregated decode worker); NULL where the emitter did
# not report it (the vLLM plugin, rows stored before the column existed).
_TOKEN_LATENCIES_ADD = """
ALTER TABLE {db}.token_latencies{on_cluster}
    ADD COLUMN IF NOT EXISTS step_prefill_tokens Nullable(UInt32)
"""

_KV_TRANSFERS = """
CREATE TABLE IF NOT EXISTS {db}.kv_transfers{on_cluster} (
    ts DateTime64(9) CODEC(Delta, ZSTD(1)),
    trace_id String CODEC(ZSTD(1)),
    src_node LowCardinality(String),
    dst_node LowCardinality(String),
    duration_s Float64,
    bytes UInt64,
    blocks UInt32,
    backend LowCardinality(String),
    status LowCardinality(String)
) ENGINE = {engine}
PARTITION BY toDate(ts)
ORDER BY (src_node, dst_node, ts)
{ttl_ts}SETTINGS index_granularity = 8192
"""

_NODE_CLOCKS = """
CREATE TABLE IF NOT EXISTS {db}.node_clocks{on_cluster} (
    ts DateTime64(9) CODEC(Delta, ZSTD(1)),
    node LowCardinality(String),
    offset_s Float64,
    error_s Float64,
    reference_node LowCardinality(String)
) ENGINE = {engine}
ORDER BY (node, ts)
SETTINGS index_granularity = 8192
"""

# Packed token emissions (schemas/packed.py), one row per llm.decode span, expanded by
# ClickHouse itself: the two views below write exactly the otel_traces rows and the
# token_latencies rows the collector writes for the same emissions sent one span each
# (span ids as schemas.packed.token_span_id derives them). A Null table keeps nothing.
_PACKED_TOKENS = """
CREATE TABLE IF NOT EXISTS {db}.packed_tokens{on_cluster} (
    TraceId String,
    DecodeSpanId String,
    start_ns Int64,
    ServiceName LowCardinality(String),
    ResourceAttributes Map(LowCardinality(String), String),
    ScopeName String,
    ScopeVersion String,
    node LowCardinality(String),
    times Array(Int64),
    steps Array(Int64),
    counts Array(UInt16),
    batch_sizes Array(UInt16),
    prefill_tokens Array(Nullable(UInt32))
) ENGINE = Null
"""

_PACKED_TOKENS_ADD = """
ALTER TABLE {db}.packed_tokens{on_cluster}
    ADD COLUMN IF NOT EXISTS prefill_tokens Array(Nullable(UInt32))
"""

# The first release's views, without prefill counts. Their replacements below have new
# names so that a store made by that release gets them (a materialized view cannot be
# created over an existing one); dropping the old ones first means an insert that races
# an upgrade is at worst expanded by neither, never twice. A lone collector runs this
# DDL before its receivers start, so it never races itself.
_PACKED_TOKENS_DROP_OLD = """
DROP VIEW IF EXISTS {db}.{view}{on_cluster}
"""

_PACKED_ARRAY_JOIN = """ARRAY JOIN
    arrayPopBack(times) AS t_start,
    arrayPopFront(times) AS t_end,
    steps AS step,
    counts AS cnt,
    batch_sizes AS bs,
    prefill_tokens AS pf,
    arrayCumSum(counts) AS upto,
    arrayEnumerate(steps) AS i"""

_PACKED_TOKENS_SPANS_MV = """
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.packed_tokens_spans_v3_mv{on_cluster}
TO {db}.otel_traces
AS SELECT
    fromUnixTimestamp64Nano(start_ns + t_start) AS Timestamp,
    TraceId,
    {token_span_id} AS SpanId,
    DecodeSpanId AS ParentSpanId,
    'llm.token' AS SpanName,
    'Internal' AS SpanKind,
    ServiceName,
    ResourceAttributes,
    ScopeName,
    ScopeVersion,
    -- a version 1 payload has no prefill counts: its spans carry no such attribute
    mapFilter((k, v) -> v IS NOT NULL, map(
        'tokentrace.emission.index', toString(i - 1),
        'tokentrace.token.index', toString(upto - cnt),
        'tokentrace.token.count', toString(cnt),
        'tokentrace.engine.step', toString(step),
        'tokentrace.batch.size', toString(bs),
        'tokentrace.step.prefill_tokens', toString(pf)
    )) AS SpanAttributes,
    toUInt64(t_end - t_start) AS Duration,
    'Unset' AS StatusCode
FROM (
    SELECT *, reinterpretAsUInt64(reverse(unhex(DecodeSpanId))) AS decode_id
    FROM {db}.packed_tokens
)
{array_join}
"""

# The one definition of a token_latencies row: from an llm.token span in otel_traces,
# whether it arrived as its own span or ClickHouse expanded it from a packed decode span
# (the view above inserts into otel_traces, which fires this one). Attribute values that
# are missing, unparsable or out of range become NULL or the column's default.
_TOKEN_LATENCIES_MV = """
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.token_latencies_mv{on_cluster}
TO {db}.token_latencies
AS SELECT
    fromUnixTimestamp64Nano(toUnixTimestamp64Nano(Timestamp) + toInt64(Duration)) AS ts,
    TraceId AS trace_id,
    {node} AS node,
    ifNull({token_index}, 0) AS token_index,
    -- the first emission has no gap: its span starts at decode start (by emission
    -- index: a chat role chunk carries 0 tokens; older emitters by token index)
    if(ifNull({emission_index} = 0, token_index = 0), NULL, Duration / 1e9) AS itl_s,
    ifNull({token_count}, 1) AS tokens,
    ifNull({batch_size}, 0) AS batch_size,
    {step_prefill_tokens} AS step_prefill_tokens
FROM {db}.otel_traces
WHERE SpanName = 'llm.token'
"""


def _uint_sql(attribute: str, type_name: str, max_value: int) -> str:
    """A non-negative integer span attribute (sent as an int, or a float or string of
    one) as ``type_name``, NULL when missing, unparsable or above ``max_value``."""
    value = f"toFloat64OrNull(SpanAttributes['{attribute}'])"
    return (
        f"if({value} >= 0 AND {value} <= {max_value} AND {value} = floor({value}), "
        f"to{type_name}({value}), NULL)"
    )


TABLES = (
    "otel_traces",
    "otel_traces_trace_id_ts",
    "request_parts",
    "token_latencies",
    "kv_transfers",
    "node_clocks",
)


def ddl_statements(
    database: str = DATABASE,
    cluster: str | None = None,
    ttl_days: int | None = None,
) -> list[str]:
    """The statements that create tokentrace's database, in order; all idempotent.

    ``cluster`` adds ``ON CLUSTER`` and uses ReplicatedMergeTree engines (a
    Distributed layer on top is the operator's choice of sharding key); ``ttl_days``
    drops whole daily partitions older than that many days.
    """
    if not database.isidentifier():
        raise ValueError(f"database name must be an identifier, got {database!r}")
    if cluster is not None and not cluster.replace("-", "_").isidentifier():
        raise ValueError(f"cluster name must be an identifier, got {cluster!r}")
    if ttl_days is not None and ttl_days <= 0:
        raise ValueError(f"ttl_days must be positive, got {ttl_days!r}")
    on_cluster = f" ON CLUSTER {cluster}" if cluster else ""
    if cluster:
        engine = "ReplicatedMergeTree"
        agg_engine = "ReplicatedAggregatingMergeTree"
    else:
        engine = "MergeTree"
        agg_engine = "AggregatingMergeTree"

    def ttl(column: str) -> str:
        return f"TTL toDateTime({column}) + toIntervalDay({ttl_days})\n" if ttl_days else ""

    fmt = {
        "db": database,
        "on_cluster": on_cluster,
        "engine": engine,
        "agg_engine": agg_engine,
        "ttl": ttl("Timestamp"),
        "ttl_start": ttl("Start"),
        "ttl_ts": ttl("ts"),
        "clock_columns": ",\n".join(
            f"    {name} SimpleAggregateFunction({spec})" for name, spec in _CLOCK_COLUMNS
        ),
        "array_join": _PACKED_ARRAY_JOIN,
        "add_clock_columns": ",\n".join(
            f"    ADD COLUMN IF NOT EXISTS {name} SimpleAggregateFunction({spec})"
            for name, spec in _CLOCK_COLUMNS
        ),
    }
    statements = [f"CREATE DATABASE IF NOT EXISTS {database}{on_cluster}"]
    for template in (
        _OTEL_TRACES,
        _TRACE_ID_TS,
        _TRACE_ID_TS_MV,
        _REQUEST_PARTS,
        _REQUEST_PARTS_ADD,
        _REQUESTS_VIEW,
        _TOKEN_LATENCIES,
        _TOKEN_LATENCIES_ADD,
        _KV_TRANSFERS,
        _NODE_CLOCKS,
        _PACKED_TOKENS,
        _PACKED_TOKENS_ADD,
    ):
        statements.append(template.format(**fmt).strip())
        # Earlier versions of the views below (v1: no prefill counts; v2: no emission
    # index, and the first emission found by token index; the rows views: token rows
    # from packed spans by a definition of their own, before token_latencies_mv).
    for view in (
        "packed_tokens_spans_mv",
        "packed_tokens_rows_mv",
        "packed_tokens_spans_v2_mv",
        "packed_tokens_rows_v2_mv",
        "packed_tokens_rows_v3_mv",
    ):
        statements.append(_PACKED_TOKENS_DROP_OLD.format(view=view, **fmt).strip())
    span_id = token_span_id_sql("decode_id", "i")  # i: arrayEnumerate, 1-based
    statements.append(_PACKED_TOKENS_SPANS_MV.format(token_span_id=span_id, **fmt).strip())
    statements.append(
        _TOKEN_LATENCIES_MV.format(
            node=node_sql("ResourceAttributes"),
            token_index=_uint_sql(A.TOKEN_INDEX, "UInt32", 2**32 - 1),
            emission_index=_uint_sql(A.EMISSION_INDEX, "UInt32", 2**32 - 1),
            token_count=_uint_sql(A.TOKEN_COUNT, "UInt16", 2**16 - 1),
            batch_size=_uint_sql(A.BATCH_SIZE, "UInt16", 2**16 - 1),
            step_prefill_tokens=_uint_sql(A.STEP_PREFILL_TOKENS, "UInt32", 2**32 - 1),
            **fmt,
        ).strip()
    )
    if not cluster:
        # Replays of the collector's write-ahead log insert with the same deduplication
        # tokens as the first attempt; a plain MergeTree only remembers tokens with a
        # window (Replicated engines always do). Also upgrades stores made without it.
        statements.extend(
            f"ALTER TABLE {database}.{table} MODIFY SETTING "
            f"non_replicated_deduplication_window = {DEDUP_WINDOW_BLOCKS}"
            for table in TABLES
        )
    return statements


#: The user the collector's query API reads as on a ClickHouse server, by default.
QUERY_USER = "tokentrace_query"


def query_user_statements(
    user: str,
    password: str,
    limits: Mapping[str, Any],
    database: str = DATABASE,
    cluster: str | None = None,
) -> list[str]:
    """The statements that create (or reset) the least-privileged user the query API
    reads as on a ClickHouse server, in order; running them again brings an existing
    user back to exactly this.

    The user may ``SELECT`` from ``database.*`` and nothing else: no other database,
    no table function source (``file``, ``url``, ``remote``, ``s3``, …: those need grants
    it does not have), no DDL or writes. Its settings profile makes it ``readonly = 2``
    (it may set settings, not ``readonly``) and caps each of ``limits`` (setting name →
    value: numbers become a ``MAX``, strings are fixed). Only the password's SHA-256 is
    sent. chDB has no users: these are for a server only.
    """
    if not user.replace("-", "_").isidentifier():
        raise ValueError(f"user name must be an identifier, got {user!r}")
    if not database.isidentifier():
        raise ValueError(f"database name must be an identifier, got {database!r}")
    if cluster is not None and not cluster.replace("-", "_").isidentifier():
        raise ValueError(f"cluster name must be an identifier, got {cluster!r}")
    if not password:
        raise ValueError("the query user needs a password")
    on_cluster = f" ON CLUSTER `{cluster}`" if cluster else ""
    constraints = ["readonly = 2 CONST"]
    for name, value in limits.items():
        if not name.isidentifier():
            raise ValueError(f"setting name must be an identifier, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            text = str(value).replace("\\", "\\\\").replace("'", "\\'")
            constraints.append(f"{name} = '{text}' CONST")
        else:
            constraints.append(f"{name} = {value!r} MAX {value!r}")
    digest = hashlib.sha256(password.encode("utf-8")).hexdigest()
    profile = f"{user}_limits"
    return [
        f"CREATE SETTINGS PROFILE OR REPLACE `{profile}`{on_cluster} "
        f"SETTINGS {', '.join(constraints)}",
        f"CREATE USER OR REPLACE `{user}`{on_cluster} IDENTIFIED WITH sha256_hash BY "
        f"'{digest}' DEFAULT DATABASE `{database}` SETTINGS PROFILE '{profile}'",
        f"GRANT{on_cluster} SELECT ON `{database}`.* TO `{user}`",
    ]
