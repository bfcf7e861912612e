"""What a trace search asks (:class:`TraceQuery`, its parameters parsed and checked) and
:class:`JaegerReader`, which holds every SQL statement of the Jaeger API (all
parameterised)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...store import QueryResult, Store
from .rows import SPAN_COLUMNS, SpanRow, align_clocks, group_by_trace

_HEX_RE = re.compile(r"[0-9a-fA-F]{1,32}")


# -- parameters ------------------------------------------------------------------------


class BadParameter(ValueError):
    """A query parameter was malformed; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"malformed parameter {param}: {message}")
        self.param = param


_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


def parse_duration_ns(text: str) -> int:
    """A Go duration (``"10ms"``, ``"1.5s"``, ``"1h2m"``) in nanoseconds; ValueError if
    malformed or negative."""
    s = text.strip()
    if s == "0":
        return 0
    if not s:
        raise ValueError("empty duration")
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m or m.group(1) in ("", "."):
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    return round(total)


def normalize_trace_id(text: str) -> str:
    """A trace id as 32 lowercase hex chars (shorter ids are left-padded as Jaeger does);
    ValueError if not 1..32 hex digits."""
    if not _HEX_RE.fullmatch(text):
        raise ValueError(f"trace id must be 1 to 32 hex digits, got {text!r}")
    return text.lower().rjust(32, "0")


def tag_map(text: str, param: str) -> dict[str, str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadParameter(param, f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise BadParameter(param, "must be a JSON object of key → value")
    out = {}
    for k, v in value.items():
        if isinstance(v, bool):
            out[k] = "true" if v else "false"
        elif isinstance(v, int | float | str):
            out[k] = str(v)
        else:
            raise BadParameter(param, f"value of {k!r} must be a string or a number")
    return out


@dataclass(frozen=True)
class TraceQuery:
    """A trace search: every condition must hold for one span of the trace."""

    start_ns: int
    end_ns: int
    service: str = ""
    operation: str = ""
    min_duration_ns: int | None = None
    max_duration_ns: int | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    limit: int = 100


# -- SQL -------------------------------------------------------------------------------


class JaegerReader:
    """Every read the Jaeger API does; blocking (run it on a worker thread)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        db = store.database
        if not db.isidentifier():
            raise ValueError(f"database name must be an identifier, got {db!r}")
        self._traces = f"{db}.otel_traces"  # the view: stored spans and packed tokens
        self._spans = f"{db}.otel_spans"  # the stored spans only
        self._emissions = f"{db}.token_emissions"
        self._token_spans = f"{db}.token_spans"  # canonical llm.token spans, typed
        self._trace_ts = f"{db}.otel_traces_trace_id_ts"

    def _q(self, sql: str, params: dict[str, Any] | None = None) -> QueryResult:
        return self._store.query(sql, params, True)

    def services(self) -> list[str]:
        # A packed decode span's token spans are in its own service: the stored spans
        # and the typed token spans name every service without expanding a token.
        res = self._q(
            f"SELECT DISTINCT ServiceName FROM (SELECT ServiceName FROM {self._spans} "
            f"UNION ALL SELECT DISTINCT toString(ServiceName) FROM {self._token_spans}) "
            "WHERE ServiceName != '' ORDER BY ServiceName"
        )
        return [r[0] for r in res.rows]

    def operations(self, service: str, span_kind: str = "") -> list[tuple[str, str]]:
        """``(name, jaeger span kind)`` pairs; ``span_kind`` as Jaeger spells it."""
        # The stored spans, and llm.token (Internal) for a service with packed emissions
        # or typed token spans: what the otel_traces view holds, without expanding a token.
        where, tokens_where, typed_where = ["1"], ["length(times) > 1"], ["1"]
        params = {}
        if service:
            where.append("ServiceName = {service:String}")
            tokens_where.append("service_name = {service:String}")
            typed_where.append("ServiceName = {service:String}")
            params["service"] = service
        if span_kind:
            where.append("lower(SpanKind) = {kind:String}")
            tokens_where.append("'internal' = {kind:String}")
            typed_where.append("'internal' = {kind:String}")
            params["kind"] = "unspecified" if span_kind == "unspecified" else span_kind.lower()
        res = self._q(
            "SELECT DISTINCT SpanName, SpanKind FROM ("
            f"SELECT SpanName, SpanKind FROM {self._spans} WHERE {' AND '.join(where)} "
            "UNION ALL SELECT DISTINCT toLowCardinality('llm.token') AS SpanName, "
            f"toLowCardinality('Internal') AS SpanKind FROM {self._emissions} "
            f"WHERE {' AND '.join(tokens_where)} "
            "UNION ALL SELECT DISTINCT toLowCardinality('llm.token') AS SpanName, "
            f"toLowCardinality('Internal') AS SpanKind FROM {self._token_spans} "
            f"WHERE {' AND '.join(typed_where)}"
            ") ORDER BY SpanName, SpanKind",
            params,
        )
        return [(name, "" if kind == "Unspecified" else kind.lower()) for name, kind in res.rows]

    def get_traces(self, trace_ids: Sequence[str]) -> list[SpanRow]:
        """All spans of ``trace_ids`` (normalised ids), found through the trace-id
        lookup table and then read within that time window only."""
        if not trace_ids:
            return []
        window = self._q(
            f"SELECT toUnixTimestamp(min(Start)), toUnixTimestamp(max(End)) "
            f"FROM {self._trace_ts} WHERE TraceId IN {{ids:Array(String)}}",
            {"ids": list(trace_ids)},
        )
        if not window.rows or window.rows[0][0] is None:
            return []
        start_s, end_s = window.rows[0]
        if start_s == 0 and end_s == 0:  # min/max over no rows
            return []
        res = self._q(
            f"SELECT {', '.join(SPAN_COLUMNS)} FROM {self._traces} "
            "WHERE TraceId IN {ids:Array(String)} "
            # DateTime64 bounds: comparing DateTime64(9) with a DateTime misses rows in
            # chDB. End is whole seconds, so the last span started before End + 1 s.
            "AND Timestamp >= fromUnixTimestamp64Nano({start_ns:Int64}) "
            "AND Timestamp < fromUnixTimestamp64Nano({end_ns:Int64}) "
            "ORDER BY TraceId, Timestamp, SpanId",
            {
                "ids": list(trace_ids),
                "start_ns": int(start_s) * 1_000_000_000,
                "end_ns": (int(end_s) + 1) * 1_000_000_000,
            },
        )
        grouped = group_by_trace(SpanRow.from_result(res))
        return [
            row for tid in dict.fromkeys(trace_ids) for row in align_clocks(grouped.get(tid, []))
        ]

    def find_trace_ids(self, query: TraceQuery) -> list[str]:
        """Ids of the traces with a span matching ``query``, most recent first."""
        where = [
            "TraceId != ''",
            "Timestamp >= fromUnixTimestamp64Nano({start_ns:Int64})",
            "Timestamp <= fromUnixTimestamp64Nano({end_ns:Int64})",
        ]
        params: dict[str, Any] = {
            "start_ns": query.start_ns,
            "end_ns": query.end_ns,
            "limit": query.limit,
        }
        if query.service:
            where.append("ServiceName = {service:String}")
            params["service"] = query.service
        if query.operation:
            where.append("SpanName = {operation:String}")
            params["operation"] = query.operation
        if query.min_duration_ns is not None:
            where.append("Duration >= {min_d:UInt64}")
            params["min_d"] = query.min_duration_ns
        if query.max_duration_ns is not None:
            where.append("Duration <= {max_d:UInt64}")
            params["max_d"] = query.max_duration_ns
        for i, (key, value) in enumerate(query.tags.items()):
            k, v = f"tk{i}", f"tv{i}"
            params[k], params[v] = key, value
            conditions = [
                f"(mapContains(SpanAttributes, {{{k}:String}}) "
                f"AND SpanAttributes[{{{k}:String}}] = {{{v}:String}})",
                f"(mapContains(ResourceAttributes, {{{k}:String}}) "
                f"AND ResourceAttributes[{{{k}:String}}] = {{{v}:String}})",
            ]
            # Tags Jaeger derives from columns rather than attributes.
            if key == "error" and value == "true":
                conditions.append("StatusCode = 'Error'")
            elif key == "span.kind":
                conditions.append(f"lower(SpanKind) = lower({{{v}:String}})")
            elif key == "otel.status_code":
                conditions.append(f"upper(StatusCode) = upper({{{v}:String}})")
            where.append("(" + " OR ".join(conditions) + ")")
        res = self._q(
            f"SELECT TraceId, max(Timestamp) AS last FROM {self._traces} "
            f"WHERE {' AND '.join(where)} GROUP BY TraceId ORDER BY last DESC "
            "LIMIT {limit:UInt32}",
            params,
        )
        return [r[0] for r in res.rows]

    def find_traces(self, query: TraceQuery) -> list[SpanRow]:
        return self.get_traces(self.find_trace_ids(query))

    def dependencies(self, end_ns: int, lookback_ns: int) -> list[dict[str, Any]]:
        """Parent → child service call counts over cross-service ParentSpanId edges."""
        window = (
            "Timestamp >= fromUnixTimestamp64Nano({start_ns:Int64}) "
            "AND Timestamp <= fromUnixTimestamp64Nano({end_ns:Int64})"
        )
        res = self._q(
            "SELECT p.ServiceName AS parent, c.ServiceName AS child, count() AS calls "
            # A packed decode span's token spans are in its service: never an edge
            # between services. Typed token spans may name any parent.
            f"FROM (SELECT TraceId, ParentSpanId, ServiceName FROM {self._spans} "
            f"      WHERE ParentSpanId != '' AND {window} "
            f"      UNION ALL SELECT TraceId, ParentSpanId, toString(ServiceName) "
            f"      FROM {self._token_spans} WHERE {window}) AS c "
            f"INNER JOIN (SELECT TraceId, SpanId, ServiceName FROM {self._spans} "
            f"      WHERE {window}) AS p "
            "ON c.TraceId = p.TraceId AND c.ParentSpanId = p.SpanId "
            "WHERE p.ServiceName != c.ServiceName "
            "GROUP BY parent, child ORDER BY parent, child",
            {"start_ns": end_ns - lookback_ns, "end_ns": end_ns},
        )
        return [
            {"parent": parent, "child": child, "callCount": int(calls)}
            for parent, child, calls in res.rows
        ]
