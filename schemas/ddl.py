"""ClickHouse DDL for tokentrace's database, single node or cluster.

``otel_spans`` (the spans as stored), the ``otel_traces`` view over it and its trace-id
lookup table keep the OpenTelemetry Collector ClickHouse exporter's layout column for
column, so Grafana's trace view reads ``otel_traces`` and the Go collector's exporter
writes ``otel_spans`` unchanged. Packed token emissions are stored as arrays, one
``token_emissions`` row per decode span, and expanded only when the ``otel_traces`` and
``token_latencies`` views are read: a few bytes per token instead of a row per token
(see ``_TOKEN_EMISSIONS``). One setting of ``otel_spans`` differs from the exporter's:
granules of 1024 rows instead of 8192. A trace's spans sit in a handful of granules (one
per service and span name), so a trace lookup decompresses an eighth of the rows: 14
instead of 29 ms with 2 million spans stored (bench/query.py, before token arrays).

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

#: ``otel_spans`` (and the ``otel_traces`` view) column names, in table order.
SPAN_COLUMNS = (
    "Timestamp",
    "TraceId",
    "SpanId",
    "ParentSpanId",
    "TraceState",
    "SpanName",
    "SpanKind",
    "ServiceName",
    "ResourceAttributes",
    "ScopeName",
    "ScopeVersion",
    "SpanAttributes",
    "Duration",
    "StatusCode",
    "StatusMessage",
    "Events.Timestamp",
    "Events.Name",
    "Events.Attributes",
    "Links.TraceId",
    "Links.SpanId",
    "Links.TraceState",
    "Links.Attributes",
)

#: ``token_emissions`` column names, in table order.
TOKEN_EMISSIONS_COLUMNS = (
    "decode_start",
    "trace_id",
    "decode_span_id",
    "service_name",
    "resource_attributes",
    "scope_name",
    "scope_version",
    "node",
    "times",
    "steps",
    "counts",
    "batch_sizes",
    "prefill_tokens",
)

#: ``token_spans`` column names, in table order.
TOKEN_SPANS_COLUMNS = (
    "Timestamp",
    "TraceId",
    "SpanId",
    "ParentSpanId",
    "Duration",
    "ServiceName",
    "Node",
    "ResourceId",
    "EmissionIndex",
    "TokenIndex",
    "TokenCount",
    "EngineStep",
    "BatchSize",
    "StepPrefillTokens",
)

_OTEL_SPANS = """
CREATE TABLE IF NOT EXISTS {db}.otel_spans{on_cluster} (
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
FROM {db}.otel_spans
WHERE TraceId != ''
GROUP BY TraceId
"""

# The token spans of packed decode spans, where their first and last start: so a trace's
# row spans its tokens too (Grafana's trace query bounds its scan by it).
_TOKEN_EMISSIONS_TRACE_ID_TS_MV = """
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.token_emissions_trace_id_ts_mv{on_cluster}
TO {db}.otel_traces_trace_id_ts
AS SELECT
    trace_id AS TraceId,
    min(fromUnixTimestamp64Nano(toUnixTimestamp64Nano(decode_start) + times[1])) AS Start,
    max(fromUnixTimestamp64Nano(toUnixTimestamp64Nano(decode_start) + times[-2])) AS End
FROM {db}.token_emissions
WHERE length(times) > 1
GROUP BY trace_id
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

# Token rows of llm.token spans that arrived one span each (the vLLM plugin in spans
# mode, any emitter of its own): the token_latencies_mv below fills it from otel_spans.
# Before token emissions were stored as arrays this table was token_latencies itself;
# upgrade_statements renames it.
_TOKEN_SPAN_LATENCIES = """
CREATE TABLE IF NOT EXISTS {db}.token_span_latencies{on_cluster} (
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
_TOKEN_SPAN_LATENCIES_ADD = """
ALTER TABLE {db}.token_span_latencies{on_cluster}
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

# Packed token emissions (schemas/packed.py): one row per llm.decode span, its
# emissions as arrays -- a few bytes per token instead of a row per token. Nothing
# expands them when they are stored: the otel_traces and token_latencies views below do
# when they are read, into exactly the llm.token spans and token rows the same emissions
# sent one span each make (span ids as schemas.packed.token_span_id derives them).
# Sorted by node and time like token_latencies; a trace's row is found by the bloom
# filter. Times and steps grow within a row, so they are stored as deltas.
_TOKEN_EMISSIONS = """
CREATE TABLE IF NOT EXISTS {db}.token_emissions{on_cluster} (
    decode_start DateTime64(9) CODEC(Delta, ZSTD(1)),
    trace_id String CODEC(ZSTD(1)),
    decode_span_id String CODEC(ZSTD(1)),
    service_name LowCardinality(String),
    resource_attributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    scope_name LowCardinality(String),
    scope_version LowCardinality(String),
    node LowCardinality(String),
    times Array(Int64) CODEC(Delta, ZSTD(1)),
    steps Array(Int64) CODEC(Delta, ZSTD(1)),
    counts Array(UInt16) CODEC(ZSTD(1)),
    batch_sizes Array(UInt16) CODEC(ZSTD(1)),
    prefill_tokens Array(Nullable(UInt32)) CODEC(ZSTD(1)),
    INDEX idx_trace_id trace_id TYPE bloom_filter(0.001) GRANULARITY 1
) ENGINE = {engine}
PARTITION BY toDate(decode_start)
ORDER BY (node, decode_start)
{ttl_decode_start}SETTINGS index_granularity = 1024
"""

# llm.token spans sent one span each in the shape tokentrace's emitters give them (name,
# kind, ids, times and the five or six integer token attributes in their order, nothing
# else: collector/ingest/tokenspans.py): the attributes as typed columns, and the
# resource and scope once per distinct one in token_span_resources (ResourceId: a hash of
# them), so a token span costs ClickHouse no map of strings to store. The otel_traces and
# token_latencies views below read them back as exactly the span and token row the same
# span stored in otel_spans gives. Sorted like token_span_latencies; a trace found by the
# bloom filter.
_TOKEN_SPANS = """
CREATE TABLE IF NOT EXISTS {db}.token_spans{on_cluster} (
    Timestamp DateTime64(9) CODEC(Delta, ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    Duration UInt64 CODEC(ZSTD(1)),
    ServiceName LowCardinality(String),
    Node LowCardinality(String),
    ResourceId UInt64 CODEC(ZSTD(1)),
    EmissionIndex Int64 CODEC(Delta, ZSTD(1)),
    TokenIndex Int64 CODEC(Delta, ZSTD(1)),
    TokenCount Int64 CODEC(ZSTD(1)),
    EngineStep Int64 CODEC(Delta, ZSTD(1)),
    BatchSize Int64 CODEC(ZSTD(1)),
    StepPrefillTokens Nullable(Int64) CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1
) ENGINE = {engine}
PARTITION BY toDate(Timestamp)
ORDER BY (Node, Timestamp)
{ttl}SETTINGS index_granularity = 1024
"""

# Each resource and scope token_spans rows name, once (again per block that has it: the
# engine keeps one copy of a ResourceId when parts merge). Never expires: a few rows per
# node and version.
_TOKEN_SPAN_RESOURCES = """
CREATE TABLE IF NOT EXISTS {db}.token_span_resources{on_cluster} (
    ResourceId UInt64,
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1))
) ENGINE = {replacing_engine}
ORDER BY ResourceId
"""

_TOKEN_SPANS_TRACE_ID_TS_MV = """
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.token_spans_trace_id_ts_mv{on_cluster}
TO {db}.otel_traces_trace_id_ts
AS SELECT
    TraceId,
    min(Timestamp) AS Start,
    max(Timestamp) AS End
FROM {db}.token_spans
GROUP BY TraceId
"""

# A token_spans row as the token row _TOKEN_LATENCIES_MV makes of the same span stored in
# otel_spans: the same range checks, on the integers instead of their strings.
_TOKEN_SPANS_ROWS = """SELECT
    fromUnixTimestamp64Nano(toUnixTimestamp64Nano(Timestamp) + toInt64(Duration)) AS ts,
    TraceId AS trace_id,
    Node AS node,
    ifNull({typed_token_index}, 0) AS token_index,
    if(ifNull({typed_emission_index} = 0, token_index = 0), NULL, Duration / 1e9) AS itl_s,
    ifNull({typed_token_count}, 1) AS tokens,
    ifNull({typed_batch_size}, 0) AS batch_size,
    {typed_step_prefill_tokens} AS step_prefill_tokens
FROM {db}.token_spans"""

_ITL_BY_MINUTE_FROM_TOKEN_SPANS_MV = """
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.itl_by_minute_token_spans_mv{on_cluster}
TO {db}.itl_by_minute
AS SELECT
    toStartOfMinute(ts) AS minute,
    node,
    count() AS gaps,
    quantilesDDState(0.001, 0.5)(assumeNotNull(itl_s)) AS itl
FROM ({token_spans_rows})
WHERE itl_s IS NOT NULL
GROUP BY minute, node
"""

# One array element per emission: t_start/t_end are where its token span starts and
# ends (ns from decode_start), upto the tokens up to and including it, i its 1-based
# number.
_EMISSIONS_ARRAY_JOIN = """ARRAY JOIN
    arrayPopBack(times) AS t_start,
    arrayPopFront(times) AS t_end,
    steps AS step,
    counts AS cnt,
    batch_sizes AS bs,
    prefill_tokens AS pf,
    arrayCumSum(counts) AS upto,
    arrayEnumerate(steps) AS i"""

# The spans as stored, and the llm.token spans of packed decode spans, in the
# OpenTelemetry Collector ClickHouse exporter's layout: what the Jaeger API, Grafana's
# trace view and SQL users read. A filter on TraceId reaches both branches before
# anything is expanded.
_OTEL_TRACES_VIEW = """
CREATE OR REPLACE VIEW {db}.otel_traces{on_cluster} AS
SELECT {span_columns}
FROM {db}.otel_spans
UNION ALL
SELECT
    fromUnixTimestamp64Nano(toUnixTimestamp64Nano(decode_start) + t_start) AS Timestamp,
    trace_id AS TraceId,
    {token_span_id} AS SpanId,
    decode_span_id AS ParentSpanId,
    '' AS TraceState,
    toLowCardinality('llm.token') AS SpanName,
    toLowCardinality('Internal') AS SpanKind,
    service_name AS ServiceName,
    resource_attributes AS ResourceAttributes,
    toString(scope_name) AS ScopeName,
    toString(scope_version) AS ScopeVersion,
    -- a version 1 payload has no prefill counts: its spans carry no such attribute
    CAST(mapFilter((k, v) -> v IS NOT NULL, map(
        'tokentrace.emission.index', toString(i - 1),
        'tokentrace.token.index', toString(upto - cnt),
        'tokentrace.token.count', toString(cnt),
        'tokentrace.engine.step', toString(step),
        'tokentrace.batch.size', toString(bs),
        'tokentrace.step.prefill_tokens', toString(pf)
    )), 'Map(LowCardinality(String), String)') AS SpanAttributes,
    toUInt64(t_end - t_start) AS Duration,
    toLowCardinality('Unset') AS StatusCode,
    '' AS StatusMessage,
    CAST([], 'Array(DateTime64(9))') AS `Events.Timestamp`,
    CAST([], 'Array(LowCardinality(String))') AS `Events.Name`,
    CAST([], 'Array(Map(LowCardinality(String), String))') AS `Events.Attributes`,
    CAST([], 'Array(String)') AS `Links.TraceId`,
    CAST([], 'Array(String)') AS `Links.SpanId`,
    CAST([], 'Array(String)') AS `Links.TraceState`,
    CAST([], 'Array(Map(LowCardinality(String), String))') AS `Links.Attributes`
FROM (
    SELECT *, reinterpretAsUInt64(reverse(unhex(decode_span_id))) AS decode_id
    FROM {db}.token_emissions
)
{array_join}
UNION ALL
SELECT
    t.Timestamp AS Timestamp,
    t.TraceId AS TraceId,
    t.SpanId AS SpanId,
    t.ParentSpanId AS ParentSpanId,
    '' AS TraceState,
    toLowCardinality('llm.token') AS SpanName,
    toLowCardinality('Internal') AS SpanKind,
    t.ServiceName AS ServiceName,
    r.ResourceAttributes AS ResourceAttributes,
    r.ScopeName AS ScopeName,
    r.ScopeVersion AS ScopeVersion,
    CAST(mapFilter((k, v) -> v IS NOT NULL, map(
        'tokentrace.emission.index', toString(t.EmissionIndex),
        'tokentrace.token.index', toString(t.TokenIndex),
        'tokentrace.token.count', toString(t.TokenCount),
        'tokentrace.engine.step', toString(t.EngineStep),
        'tokentrace.batch.size', toString(t.BatchSize),
        'tokentrace.step.prefill_tokens', toString(t.StepPrefillTokens)
    )), 'Map(LowCardinality(String), String)') AS SpanAttributes,
    t.Duration AS Duration,
    toLowCardinality('Unset') AS StatusCode,
    '' AS StatusMessage,
    CAST([], 'Array(DateTime64(9))') AS `Events.Timestamp`,
    CAST([], 'Array(LowCardinality(String))') AS `Events.Name`,
    CAST([], 'Array(Map(LowCardinality(String), String))') AS `Events.Attributes`,
    CAST([], 'Array(String)') AS `Links.TraceId`,
    CAST([], 'Array(String)') AS `Links.SpanId`,
    CAST([], 'Array(String)') AS `Links.TraceState`,
    CAST([], 'Array(Map(LowCardinality(String), String))') AS `Links.Attributes`
FROM {db}.token_spans AS t
ANY LEFT JOIN {db}.token_span_resources AS r ON t.ResourceId = r.ResourceId
"""

# The one definition of a token row from an llm.token span stored as its own span.
# Attribute values that are missing, unparsable or out of range become NULL or the
# column's default.
_TOKEN_LATENCIES_MV = """
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.token_latencies_mv{on_cluster}
TO {db}.token_span_latencies
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
FROM {db}.otel_spans
WHERE SpanName = 'llm.token'
"""

# Token rows of both kinds: the same rows whichever way the emissions arrived (the
# packed branch is the llm.token span definition above applied to the spans the
# otel_traces view expands, computed from the arrays directly).
_TOKEN_LATENCIES_VIEW = """
CREATE OR REPLACE VIEW {db}.token_latencies{on_cluster} AS
SELECT ts, trace_id, node, token_index, itl_s, tokens, batch_size, step_prefill_tokens
FROM {db}.token_span_latencies
UNION ALL
SELECT
    fromUnixTimestamp64Nano(toUnixTimestamp64Nano(decode_start) + t_end) AS ts,
    trace_id,
    node,
    if(upto - cnt <= 4294967295, toUInt32(upto - cnt), 0) AS token_index,
    if(i = 1, NULL, toUInt64(t_end - t_start) / 1e9) AS itl_s,
    cnt AS tokens,
    bs AS batch_size,
    pf AS step_prefill_tokens
FROM {db}.token_emissions
{array_join}
UNION ALL
{token_spans_rows}
"""

# Per decode node and minute, a DDSketch of the token gaps (accuracy parameter 0.001:
# within 1% of the exact percentile, tests/unit/test_one_percentile.py) and their
# count, from both kinds of token rows as they are stored: what the dashboard's
# ITL-over-time panel reads, so hours of percentiles do not expand every token again.
# Quantile states merge across minutes at any levels (quantilesDDMerge(0.001, ...)).
_ITL_BY_MINUTE = """
CREATE TABLE IF NOT EXISTS {db}.itl_by_minute{on_cluster} (
    minute DateTime CODEC(Delta, ZSTD(1)),
    node LowCardinality(String),
    gaps SimpleAggregateFunction(sum, UInt64),
    itl AggregateFunction(quantilesDD(0.001, 0.5), Float64)
) ENGINE = {agg_engine}
PARTITION BY toDate(minute)
ORDER BY (node, minute)
{ttl_minute}SETTINGS index_granularity = 8192
"""

_ITL_BY_MINUTE_FROM_SPANS_MV = """
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.itl_by_minute_spans_mv{on_cluster}
TO {db}.itl_by_minute
AS SELECT
    toStartOfMinute(ts) AS minute,
    node,
    count() AS gaps,
    quantilesDDState(0.001, 0.5)(assumeNotNull(itl_s)) AS itl
FROM {db}.token_span_latencies
WHERE itl_s IS NOT NULL
GROUP BY minute, node
"""

_ITL_BY_MINUTE_FROM_EMISSIONS_MV = """
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.itl_by_minute_emissions_mv{on_cluster}
TO {db}.itl_by_minute
AS SELECT
    toStartOfMinute(fromUnixTimestamp64Nano(toUnixTimestamp64Nano(decode_start) + t_end))
        AS minute,
    node,
    count() AS gaps,
    quantilesDDState(0.001, 0.5)(toUInt64(t_end - t_start) / 1e9) AS itl
FROM {db}.token_emissions
{array_join}
WHERE i > 1
GROUP BY minute, node
"""


def _typed_uint_sql(column: str, type_name: str, max_value: int) -> str:
    """:func:`_uint_sql` for a ``token_spans`` integer column: the same value, since the
    attribute's string is that integer in decimal."""
    return f"if({column} >= 0 AND {column} <= {max_value}, to{type_name}({column}), NULL)"


def _uint_sql(attribute: str, type_name: str, max_value: int) -> str:
    """A non-negative integer span attribute (sent as an int, or a float or string of
    one) as ``type_name``, NULL when missing, unparsable or above ``max_value``."""
    value = f"toFloat64OrNull(SpanAttributes['{attribute}'])"
    return (
        f"if({value} >= 0 AND {value} <= {max_value} AND {value} = floor({value}), "
        f"to{type_name}({value}), NULL)"
    )


#: How every table merges its parts, set for memory: a merge reads and writes one column
#: at a time (vertical), in blocks of 2,048 rows, instead of all columns of every part
#: at once. A collector's embedded ClickHouse merges while it inserts, and ClickHouse's
#: defaults (vertical from 131,072 rows and 11 columns, 8,192-row blocks) held 20-150 MB
#: more at peak (``bench.store_cost``; about 100 MB of a collector's peak under
#: ``bench.ingest``'s packed load), at the same insert rate.
MERGE_SETTINGS = {
    "vertical_merge_algorithm_min_rows_to_activate": 1,
    "vertical_merge_algorithm_min_columns_to_activate": 1,
    "merge_max_block_size": 2048,
}

TABLES = (
    "otel_spans",
    "otel_traces_trace_id_ts",
    "request_parts",
    "token_span_latencies",
    "token_emissions",
    "token_spans",
    "token_span_resources",
    "itl_by_minute",
    "kv_transfers",
    "node_clocks",
)

#: The views users read, over the tables above: the spans and token rows as they were
#: stored before token emissions became arrays, and the per-request fold.
VIEWS = ("otel_traces", "token_latencies", "requests")

# Materialized views of earlier releases: v1 had no prefill counts; v2 no emission index
# (the first emission found by token index); the rows views made token rows from packed
# spans by a definition of their own, before token_latencies_mv; the v3 spans view
# expanded every packed emission into a stored span, before emissions were arrays.
_OLD_VIEWS = (
    "packed_tokens_spans_mv",
    "packed_tokens_rows_mv",
    "packed_tokens_spans_v2_mv",
    "packed_tokens_rows_v2_mv",
    "packed_tokens_rows_v3_mv",
    "packed_tokens_spans_v3_mv",
)


def _checked(database: str, cluster: str | None) -> str:
    """The ``ON CLUSTER`` clause, after checking both names."""
    if not database.isidentifier():
        raise ValueError(f"database name must be an identifier, got {database!r}")
    if cluster is not None and not cluster.replace("-", "_").isidentifier():
        raise ValueError(f"cluster name must be an identifier, got {cluster!r}")
    return f" ON CLUSTER {cluster}" if cluster else ""


def upgrade_statements(
    engines: Mapping[str, str], database: str = DATABASE, cluster: str | None = None
) -> list[str]:
    """What to run before :func:`ddl_statements` on a database whose tables are
    ``engines`` (name → engine, as ``system.tables`` has them): an empty mapping (a new
    store) needs nothing.

    A store made before token emissions were stored as arrays has ``otel_traces`` and
    ``token_latencies`` as tables, where they are views now: the tables are renamed to
    what they hold (``otel_spans``, ``token_span_latencies``), rows and all, after the
    materialized views that wrote them are dropped (:func:`ddl_statements` creates
    today's). Packed emissions stored then stay where they were expanded to: spans in
    ``otel_spans``, rows in ``token_span_latencies``.
    """
    on_cluster = _checked(database, cluster)
    statements: list[str] = []
    renames = [
        (old, new)
        for old, new in (("otel_traces", "otel_spans"), ("token_latencies", "token_span_latencies"))
        if engines.get(old, "View") != "View" and new not in engines
    ]
    if renames:
        statements.extend(
            f"DROP VIEW IF EXISTS {database}.{view}{on_cluster}"
            for view in (*_OLD_VIEWS, "otel_traces_trace_id_ts_mv", "token_latencies_mv")
        )
        statements.extend(
            f"RENAME TABLE {database}.{old} TO {database}.{new}{on_cluster}" for old, new in renames
        )
    if engines.get("packed_tokens") == "Null":  # the expansion's entry point: held nothing
        statements.append(f"DROP TABLE IF EXISTS {database}.packed_tokens{on_cluster}")
    return statements


def ddl_statements(
    database: str = DATABASE,
    cluster: str | None = None,
    ttl_days: int | None = None,
) -> list[str]:
    """The statements that create tokentrace's database, in order; all idempotent.
    A store made by an earlier release needs :func:`upgrade_statements` first.

    ``cluster`` adds ``ON CLUSTER`` and uses ReplicatedMergeTree engines (a
    Distributed layer on top is the operator's choice of sharding key); ``ttl_days``
    drops whole daily partitions older than that many days.
    """
    on_cluster = _checked(database, cluster)
    if ttl_days is not None and ttl_days <= 0:
        raise ValueError(f"ttl_days must be positive, got {ttl_days!r}")
    if cluster:
        engine = "ReplicatedMergeTree"
        agg_engine = "ReplicatedAggregatingMergeTree"
        replacing_engine = "ReplicatedReplacingMergeTree"
    else:
        engine = "MergeTree"
        agg_engine = "AggregatingMergeTree"
        replacing_engine = "ReplacingMergeTree"

    def ttl(column: str) -> str:
        return f"TTL toDateTime({column}) + toIntervalDay({ttl_days})\n" if ttl_days else ""

    fmt = {
        "db": database,
        "on_cluster": on_cluster,
        "engine": engine,
        "agg_engine": agg_engine,
        "replacing_engine": replacing_engine,
        "ttl": ttl("Timestamp"),
        "ttl_start": ttl("Start"),
        "ttl_ts": ttl("ts"),
        "ttl_decode_start": ttl("decode_start"),
        "ttl_minute": ttl("minute"),
        "clock_columns": ",\n".join(
            f"    {name} SimpleAggregateFunction({spec})" for name, spec in _CLOCK_COLUMNS
        ),
        "array_join": _EMISSIONS_ARRAY_JOIN,
        "add_clock_columns": ",\n".join(
            f"    ADD COLUMN IF NOT EXISTS {name} SimpleAggregateFunction({spec})"
            for name, spec in _CLOCK_COLUMNS
        ),
        "span_columns": ", ".join(f"`{name}`" if "." in name else name for name in SPAN_COLUMNS),
        "token_span_id": token_span_id_sql("decode_id", "i"),  # i: arrayEnumerate, 1-based
        "node": node_sql("ResourceAttributes"),
        "token_index": _uint_sql(A.TOKEN_INDEX, "UInt32", 2**32 - 1),
        "emission_index": _uint_sql(A.EMISSION_INDEX, "UInt32", 2**32 - 1),
        "token_count": _uint_sql(A.TOKEN_COUNT, "UInt16", 2**16 - 1),
        "batch_size": _uint_sql(A.BATCH_SIZE, "UInt16", 2**16 - 1),
        "step_prefill_tokens": _uint_sql(A.STEP_PREFILL_TOKENS, "UInt32", 2**32 - 1),
        "typed_token_index": _typed_uint_sql("TokenIndex", "UInt32", 2**32 - 1),
        "typed_emission_index": _typed_uint_sql("EmissionIndex", "UInt32", 2**32 - 1),
        "typed_token_count": _typed_uint_sql("TokenCount", "UInt16", 2**16 - 1),
        "typed_batch_size": _typed_uint_sql("BatchSize", "UInt16", 2**16 - 1),
        "typed_step_prefill_tokens": _typed_uint_sql("StepPrefillTokens", "UInt32", 2**32 - 1),
    }
    fmt["token_spans_rows"] = _TOKEN_SPANS_ROWS.format(**fmt)
    statements = [f"CREATE DATABASE IF NOT EXISTS {database}{on_cluster}"]
    statements.extend(f"DROP VIEW IF EXISTS {database}.{view}{on_cluster}" for view in _OLD_VIEWS)
    for template in (
        _OTEL_SPANS,
        _TRACE_ID_TS,
        _TRACE_ID_TS_MV,
        _REQUEST_PARTS,
        _REQUEST_PARTS_ADD,
        _REQUESTS_VIEW,
        _TOKEN_SPAN_LATENCIES,
        _TOKEN_SPAN_LATENCIES_ADD,
        _KV_TRANSFERS,
        _NODE_CLOCKS,
        _TOKEN_EMISSIONS,
        _TOKEN_EMISSIONS_TRACE_ID_TS_MV,
        _TOKEN_SPANS,
        _TOKEN_SPAN_RESOURCES,
        _TOKEN_SPANS_TRACE_ID_TS_MV,
        _OTEL_TRACES_VIEW,
        _TOKEN_LATENCIES_MV,
        _TOKEN_LATENCIES_VIEW,
        _ITL_BY_MINUTE,
        _ITL_BY_MINUTE_FROM_SPANS_MV,
        _ITL_BY_MINUTE_FROM_EMISSIONS_MV,
        _ITL_BY_MINUTE_FROM_TOKEN_SPANS_MV,
    ):
        statements.append(template.format(**fmt).strip())
    # Replays of the collector's write-ahead log insert with the same deduplication
    # tokens as the first attempt; a plain MergeTree only remembers tokens with a window
    # (Replicated engines always do). The same statement sets MERGE_SETTINGS, and
    # upgrades stores made without any of them.
    settings = ", ".join(
        f"{name} = {value}"
        for name, value in (
            *MERGE_SETTINGS.items(),
            *(() if cluster else (("non_replicated_deduplication_window", DEDUP_WINDOW_BLOCKS),)),
        )
    )
    statements.extend(
        f"ALTER TABLE {database}.{table}{on_cluster} MODIFY SETTING {settings}" for table in TABLES
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
