CREATE DATABASE IF NOT EXISTS tokentrace;

CREATE TABLE IF NOT EXISTS tokentrace.otel_traces (
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
) ENGINE = MergeTree
PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp))
SETTINGS index_granularity = 1024, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS tokentrace.otel_traces_trace_id_ts (
    TraceId String CODEC(ZSTD(1)),
    Start DateTime CODEC(Delta, ZSTD(1)),
    End DateTime CODEC(Delta, ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = MergeTree
PARTITION BY toDate(Start)
ORDER BY (TraceId, Start)
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS tokentrace.otel_traces_trace_id_ts_mv
TO tokentrace.otel_traces_trace_id_ts
AS SELECT
    TraceId,
    min(Timestamp) AS Start,
    max(Timestamp) AS End
FROM tokentrace.otel_traces
WHERE TraceId != ''
GROUP BY TraceId;

CREATE TABLE IF NOT EXISTS tokentrace.request_parts (
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
    prefill_sent SimpleAggregateFunction(min, Nullable(DateTime64(9))),
    decode_sent SimpleAggregateFunction(min, Nullable(DateTime64(9))),
    prefill_start SimpleAggregateFunction(min, Nullable(DateTime64(9))),
    prefill_end SimpleAggregateFunction(max, Nullable(DateTime64(9))),
    decode_start SimpleAggregateFunction(min, Nullable(DateTime64(9))),
    kv_start SimpleAggregateFunction(min, Nullable(DateTime64(9))),
    prefill_clock_offset_s SimpleAggregateFunction(max, Nullable(Float64)),
    decode_clock_offset_s SimpleAggregateFunction(max, Nullable(Float64))
) ENGINE = AggregatingMergeTree
ORDER BY trace_id
SETTINGS index_granularity = 8192;

ALTER TABLE tokentrace.request_parts
    ADD COLUMN IF NOT EXISTS prefill_sent SimpleAggregateFunction(min, Nullable(DateTime64(9))),
    ADD COLUMN IF NOT EXISTS decode_sent SimpleAggregateFunction(min, Nullable(DateTime64(9))),
    ADD COLUMN IF NOT EXISTS prefill_start SimpleAggregateFunction(min, Nullable(DateTime64(9))),
    ADD COLUMN IF NOT EXISTS prefill_end SimpleAggregateFunction(max, Nullable(DateTime64(9))),
    ADD COLUMN IF NOT EXISTS decode_start SimpleAggregateFunction(min, Nullable(DateTime64(9))),
    ADD COLUMN IF NOT EXISTS kv_start SimpleAggregateFunction(min, Nullable(DateTime64(9))),
    ADD COLUMN IF NOT EXISTS prefill_clock_offset_s SimpleAggregateFunction(max, Nullable(Float64)),
    ADD COLUMN IF NOT EXISTS decode_clock_offset_s SimpleAggregateFunction(max, Nullable(Float64));

CREATE OR REPLACE VIEW tokentrace.requests AS
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
FROM tokentrace.request_parts
GROUP BY trace_id
HAVING request_id IS NOT NULL
);

CREATE TABLE IF NOT EXISTS tokentrace.token_latencies (
    ts DateTime64(9) CODEC(Delta, ZSTD(1)),
    trace_id String CODEC(ZSTD(1)),
    node LowCardinality(String),
    token_index UInt32,
    itl_s Nullable(Float64),
    tokens UInt16,
    batch_size UInt16,
    step_prefill_tokens Nullable(UInt32)
) ENGINE = MergeTree
PARTITION BY toDate(ts)
ORDER BY (node, ts)
SETTINGS index_granularity = 8192;

ALTER TABLE tokentrace.token_latencies
    ADD COLUMN IF NOT EXISTS step_prefill_tokens Nullable(UInt32);

CREATE TABLE IF NOT EXISTS tokentrace.kv_transfers (
    ts DateTime64(9) CODEC(Delta, ZSTD(1)),
    trace_id String CODEC(ZSTD(1)),
    src_node LowCardinality(String),
    dst_node LowCardinality(String),
    duration_s Float64,
    bytes UInt64,
    blocks UInt32,
    backend LowCardinality(String),
    status LowCardinality(String)
) ENGINE = MergeTree
PARTITION BY toDate(ts)
ORDER BY (src_node, dst_node, ts)
SETTINGS index_granularity = 8192;

CREATE TABLE IF NOT EXISTS tokentrace.node_clocks (
    ts DateTime64(9) CODEC(Delta, ZSTD(1)),
    node LowCardinality(String),
    offset_s Float64,
    error_s Float64,
    reference_node LowCardinality(String)
) ENGINE = MergeTree
ORDER BY (node, ts)
SETTINGS index_granularity = 8192;

CREATE TABLE IF NOT EXISTS tokentrace.packed_tokens (
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
) ENGINE = Null;

ALTER TABLE tokentrace.packed_tokens
    ADD COLUMN IF NOT EXISTS prefill_tokens Array(Nullable(UInt32));

DROP VIEW IF EXISTS tokentrace.packed_tokens_spans_mv;

DROP VIEW IF EXISTS tokentrace.packed_tokens_rows_mv;

DROP VIEW IF EXISTS tokentrace.packed_tokens_spans_v2_mv;

DROP VIEW IF EXISTS tokentrace.packed_tokens_rows_v2_mv;

DROP VIEW IF EXISTS tokentrace.packed_tokens_rows_v3_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS tokentrace.packed_tokens_spans_v3_mv
TO tokentrace.otel_traces
AS SELECT
    fromUnixTimestamp64Nano(start_ns + t_start) AS Timestamp,
    TraceId,
    leftPad(lower(hex(greatest(bitXor(decode_id, i * 11400714819323198485), toUInt64(1)))), 16, '0') AS SpanId,
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
    FROM tokentrace.packed_tokens
)
ARRAY JOIN
    arrayPopBack(times) AS t_start,
    arrayPopFront(times) AS t_end,
    steps AS step,
    counts AS cnt,
    batch_sizes AS bs,
    prefill_tokens AS pf,
    arrayCumSum(counts) AS upto,
    arrayEnumerate(steps) AS i;

CREATE MATERIALIZED VIEW IF NOT EXISTS tokentrace.token_latencies_mv
TO tokentrace.token_latencies
AS SELECT
    fromUnixTimestamp64Nano(toUnixTimestamp64Nano(Timestamp) + toInt64(Duration)) AS ts,
    TraceId AS trace_id,
    coalesce(nullIf(ResourceAttributes['tokentrace.node.id'], ''), nullIf(ResourceAttributes['host.name'], ''), nullIf(ResourceAttributes['service.name'], ''), '') AS node,
    ifNull(if(toFloat64OrNull(SpanAttributes['tokentrace.token.index']) >= 0 AND toFloat64OrNull(SpanAttributes['tokentrace.token.index']) <= 4294967295 AND toFloat64OrNull(SpanAttributes['tokentrace.token.index']) = floor(toFloat64OrNull(SpanAttributes['tokentrace.token.index'])), toUInt32(toFloat64OrNull(SpanAttributes['tokentrace.token.index'])), NULL), 0) AS token_index,
    -- the first emission has no gap: its span starts at decode start (by emission
    -- index: a chat role chunk carries 0 tokens; older emitters by token index)
    if(ifNull(if(toFloat64OrNull(SpanAttributes['tokentrace.emission.index']) >= 0 AND toFloat64OrNull(SpanAttributes['tokentrace.emission.index']) <= 4294967295 AND toFloat64OrNull(SpanAttributes['tokentrace.emission.index']) = floor(toFloat64OrNull(SpanAttributes['tokentrace.emission.index'])), toUInt32(toFloat64OrNull(SpanAttributes['tokentrace.emission.index'])), NULL) = 0, token_index = 0), NULL, Duration / 1e9) AS itl_s,
    ifNull(if(toFloat64OrNull(SpanAttributes['tokentrace.token.count']) >= 0 AND toFloat64OrNull(SpanAttributes['tokentrace.token.count']) <= 65535 AND toFloat64OrNull(SpanAttributes['tokentrace.token.count']) = floor(toFloat64OrNull(SpanAttributes['tokentrace.token.count'])), toUInt16(toFloat64OrNull(SpanAttributes['tokentrace.token.count'])), NULL), 1) AS tokens,
    ifNull(if(toFloat64OrNull(SpanAttributes['tokentrace.batch.size']) >= 0 AND toFloat64OrNull(SpanAttributes['tokentrace.batch.size']) <= 65535 AND toFloat64OrNull(SpanAttributes['tokentrace.batch.size']) = floor(toFloat64OrNull(SpanAttributes['tokentrace.batch.size'])), toUInt16(toFloat64OrNull(SpanAttributes['tokentrace.batch.size'])), NULL), 0) AS batch_size,
    if(toFloat64OrNull(SpanAttributes['tokentrace.step.prefill_tokens']) >= 0 AND toFloat64OrNull(SpanAttributes['tokentrace.step.prefill_tokens']) <= 4294967295 AND toFloat64OrNull(SpanAttributes['tokentrace.step.prefill_tokens']) = floor(toFloat64OrNull(SpanAttributes['tokentrace.step.prefill_tokens'])), toUInt32(toFloat64OrNull(SpanAttributes['tokentrace.step.prefill_tokens'])), NULL) AS step_prefill_tokens
FROM tokentrace.otel_traces
WHERE SpanName = 'llm.token';

ALTER TABLE tokentrace.otel_traces MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE tokentrace.otel_traces_trace_id_ts MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE tokentrace.request_parts MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE tokentrace.token_latencies MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE tokentrace.kv_transfers MODIFY SETTING non_replicated_deduplication_window = 1000;

ALTER TABLE tokentrace.node_clocks MODIFY SETTING non_replicated_deduplication_window = 1000;
