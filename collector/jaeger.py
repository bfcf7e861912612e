"""A Jaeger-compatible query API over ``otel_traces``: the v1 JSON API (Grafana's Jaeger
data source, Jaeger UI up to 2.20) and the ``/api/v3`` API (current Jaeger UI).

The row → Jaeger / OTLP-JSON conversions are pure functions of :class:`SpanRow`;
:class:`JaegerReader` holds every SQL statement (all parameterised); :func:`jaeger_router`
is the HTTP edge. Attribute values are stored as strings, so their types are recovered by
parsing: ``true``/``false`` → bool, a decimal integer → int64, a float literal → float64,
anything else → string.

Every trace is served on one clock (:mod:`.clockalign`): spans of a worker whose clock
the router measured move by that offset, no child starts before its parent on another
node, and a moved span carries ``tokentrace.clock.adjustment_us`` (and a Jaeger v1
warning) saying by how much.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tokentrace.schemas import attributes as A
from tokentrace.schemas.attributes import node_of

from .clockalign import TimedSpan, clock_shifts
from .decode import OTEL_TRACES_COLUMNS
from .store import QueryResult, Store, StoreError

__all__ = [
    "BadParameter",
    "JaegerReader",
    "SpanEvent",
    "SpanLink",
    "SpanRow",
    "TraceQuery",
    "align_clocks",
    "jaeger_router",
    "normalize_trace_id",
    "parse_duration_ns",
    "to_jaeger_traces",
    "to_otlp_json",
    "trace_summaries",
    "typed_value",
]

_SAFE_INT = 2**53 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT_RE = re.compile(r"-?(?:0|[1-9][0-9]*)")
_FLOAT_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+(?:e[+-][0-9]+)?|e[+-][0-9]+)")
_HEX_RE = re.compile(r"[0-9a-fA-F]{1,32}")

_OTLP_KIND = {
    "Unspecified": 0,
    "Internal": 1,
    "Server": 2,
    "Client": 3,
    "Producer": 4,
    "Consumer": 5,
}
_OTLP_STATUS = {"Unset": 0, "Ok": 1, "Error": 2}

# The columns read for a span: all of otel_traces, in insert order.
SPAN_COLUMNS = OTEL_TRACES_COLUMNS


# -- rows ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpanEvent:
    time_ns: int
    name: str
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SpanLink:
    trace_id: str
    span_id: str
    trace_state: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SpanRow:
    """One ``otel_traces`` row; times in integer nanoseconds since the epoch."""

    trace_id: str
    span_id: str
    name: str
    start_ns: int
    duration_ns: int
    service_name: str
    parent_span_id: str = ""
    trace_state: str = ""
    kind: str = "Unspecified"
    resource_attributes: Mapping[str, str] = field(default_factory=dict)
    scope_name: str = ""
    scope_version: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    status_code: str = "Unset"
    status_message: str = ""
    events: tuple[SpanEvent, ...] = ()
    links: tuple[SpanLink, ...] = ()

    @classmethod
    def from_result(cls, result: QueryResult) -> list[SpanRow]:
        """Rows of a ``SELECT`` of :data:`SPAN_COLUMNS` (in that order)."""
        out = []
        for row in result.rows:
            v = dict(zip(result.column_names, row, strict=True))
            events = tuple(
                SpanEvent(_ns(ts), name, attrs or {})
                for ts, name, attrs in zip(
                    v["Events.Timestamp"], v["Events.Name"], v["Events.Attributes"], strict=True
                )
            )
            links = tuple(
                SpanLink(tid, sid, state, attrs or {})
                for tid, sid, state, attrs in zip(
                    v["Links.TraceId"],
                    v["Links.SpanId"],
                    v["Links.TraceState"],
                    v["Links.Attributes"],
                    strict=True,
                )
            )
            out.append(
                cls(
                    trace_id=v["TraceId"],
                    span_id=v["SpanId"],
                    name=v["SpanName"],
                    start_ns=_ns(v["Timestamp"]),
                    duration_ns=int(v["Duration"]),
                    service_name=v["ServiceName"],
                    parent_span_id=v["ParentSpanId"],
                    trace_state=v["TraceState"],
                    kind=v["SpanKind"],
                    resource_attributes=v["ResourceAttributes"] or {},
                    scope_name=v["ScopeName"],
                    scope_version=v["ScopeVersion"],
                    attributes=v["SpanAttributes"] or {},
                    status_code=v["StatusCode"],
                    status_message=v["StatusMessage"],
                    events=events,
                    links=links,
                )
            )
        return out


def align_clocks(rows: Sequence[SpanRow]) -> list[SpanRow]:
    """The spans of one trace moved onto the router's clock (see :mod:`.clockalign`);
    a moved span's events move with it and it gains a ``tokentrace.clock.adjustment_us``
    attribute."""
    shifts = clock_shifts(
        [
            TimedSpan(
                r.span_id,
                r.parent_span_id,
                node_of(r.resource_attributes),
                r.name,
                r.start_ns,
                r.attributes,
            )
            for r in rows
        ]
    )
    if not shifts:
        return list(rows)
    out = []
    for row in rows:
        by = shifts.get(row.span_id, 0)
        if by:
            row = replace(
                row,
                start_ns=row.start_ns + by,
                attributes={**row.attributes, A.CLOCK_ADJUSTMENT_US: str(round(by / 1000))},
                events=tuple(replace(e, time_ns=e.time_ns + by) for e in row.events),
            )
        out.append(row)
    return out


def _ns(value: Any) -> int:
    ns = getattr(value, "ns", None)
    if ns is not None:
        return int(ns)
    if isinstance(value, dt.datetime):
        return int(value.timestamp()) * 1_000_000_000 + value.microsecond * 1000
    return int(value)


# -- attribute values ------------------------------------------------------------------


def typed_value(raw: str) -> tuple[str, Any]:
    """``(type, value)`` of a stored attribute string: ``("bool", True)``,
    ``("int64", 7)``, ``("float64", 0.5)`` or ``("string", raw)``."""
    if raw == "true":
        return "bool", True
    if raw == "false":
        return "bool", False
    if _INT_RE.fullmatch(raw):
        n = int(raw)
        if _INT64_MIN <= n <= _INT64_MAX:
            return "int64", n
        return "string", raw
    if _FLOAT_RE.fullmatch(raw):
        f = float(raw)
        if math.isfinite(f):
            return "float64", f
    return "string", raw


def _jaeger_kv(key: str, typ: str, value: Any) -> dict[str, Any]:
    if typ == "int64" and not -_SAFE_INT <= value <= _SAFE_INT:
        value = str(value)  # beyond JavaScript's safe integers, as Jaeger sends them
    return {"key": key, "type": typ, "value": value}


def _jaeger_tags(attributes: Mapping[str, str]) -> list[dict[str, Any]]:
    return [_jaeger_kv(k, *typed_value(v)) for k, v in attributes.items()]


def _otlp_any(raw: str) -> dict[str, Any]:
    typ, value = typed_value(raw)
    if typ == "bool":
        return {"boolValue": value}
    if typ == "int64":
        return {"intValue": str(value)}
    if typ == "float64":
        return {"doubleValue": value}
    return {"stringValue": raw}


def _otlp_attrs(attributes: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"key": k, "value": _otlp_any(v)} for k, v in attributes.items()]


# -- v1 (Jaeger JSON model) ------------------------------------------------------------


def _span_tags(row: SpanRow) -> list[dict[str, Any]]:
    """Span attributes plus the tags Jaeger's OTLP translator adds."""
    tags = _jaeger_tags(row.attributes)
    if row.scope_name:
        tags.append(_jaeger_kv("otel.scope.name", "string", row.scope_name))
    if row.scope_version:
        tags.append(_jaeger_kv("otel.scope.version", "string", row.scope_version))
    if row.kind not in ("", "Unspecified"):
        tags.append(_jaeger_kv("span.kind", "string", row.kind.lower()))
    if row.status_code == "Error":
        tags.append(_jaeger_kv("otel.status_code", "string", "ERROR"))
        if "error" not in row.attributes:
            tags.append(_jaeger_kv("error", "bool", True))
    elif row.status_code == "Ok":
        tags.append(_jaeger_kv("otel.status_code", "string", "OK"))
    if row.status_message:
        tags.append(_jaeger_kv("otel.status_description", "string", row.status_message))
    if row.trace_state:
        tags.append(_jaeger_kv("w3c.tracestate", "string", row.trace_state))
    return tags


def _clock_warning(row: SpanRow) -> list[str] | None:
    adjusted = row.attributes.get(A.CLOCK_ADJUSTMENT_US)
    if adjusted is None:
        return None
    return [f"clock skew adjustment: moved by {adjusted} µs onto the router's clock"]


def _process_key(row: SpanRow) -> tuple[str, tuple[tuple[str, str], ...]]:
    return row.service_name, tuple(sorted(row.resource_attributes.items()))


def to_jaeger_trace(rows: Sequence[SpanRow]) -> dict[str, Any]:
    """One trace (all ``rows`` share a trace id) in Jaeger's v1 JSON model."""
    processes: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
    process_json: dict[str, dict[str, Any]] = {}
    spans = []
    for row in rows:
        key = _process_key(row)
        pid = processes.get(key)
        if pid is None:
            pid = processes[key] = f"p{len(processes) + 1}"
            process_json[pid] = {
                "serviceName": row.service_name,
                "tags": _jaeger_tags(
                    {k: v for k, v in row.resource_attributes.items() if k != "service.name"}
                ),
            }
        references = []
        if row.parent_span_id:
            references.append(
                {"refType": "CHILD_OF", "traceID": row.trace_id, "spanID": row.parent_span_id}
            )
        references.extend(
            {"refType": "FOLLOWS_FROM", "traceID": link.trace_id, "spanID": link.span_id}
            for link in row.links
        )
        spans.append(
            {
                "traceID": row.trace_id,
                "spanID": row.span_id,
                "operationName": row.name,
                "references": references,
                "startTime": row.start_ns // 1000,
                "duration": row.duration_ns // 1000,
                "tags": _span_tags(row),
                "logs": [
                    {
                        "timestamp": event.time_ns // 1000,
                        "fields": [
                            _jaeger_kv("event", "string", event.name),
                            *_jaeger_tags(event.attributes),
                        ],
                    }
                    for event in row.events
                ],
                "processID": pid,
                "warnings": _clock_warning(row),
            }
        )
    return {
        "traceID": rows[0].trace_id if rows else "",
        "spans": spans,
        "processes": process_json,
        "warnings": None,
    }


def _by_trace(rows: Iterable[SpanRow]) -> dict[str, list[SpanRow]]:
    grouped: dict[str, list[SpanRow]] = {}
    for row in rows:
        grouped.setdefault(row.trace_id, []).append(row)
    return grouped


def to_jaeger_traces(rows: Iterable[SpanRow]) -> list[dict[str, Any]]:
    """Rows of any number of traces as Jaeger v1 traces, in first-seen trace order."""
    return [to_jaeger_trace(spans) for spans in _by_trace(rows).values()]


# -- v3 (OTLP-JSON) --------------------------------------------------------------------


def _otlp_span(row: SpanRow) -> dict[str, Any]:
    span: dict[str, Any] = {"traceId": row.trace_id, "spanId": row.span_id}
    if row.trace_state:
        span["traceState"] = row.trace_state
    if row.parent_span_id:
        span["parentSpanId"] = row.parent_span_id
    span["name"] = row.name
    kind = _OTLP_KIND.get(row.kind, 0)
    if kind:
        span["kind"] = kind
    span["startTimeUnixNano"] = str(row.start_ns)
    span["endTimeUnixNano"] = str(row.start_ns + row.duration_ns)
    if row.attributes:
        span["attributes"] = _otlp_attrs(row.attributes)
    if row.events:
        span["events"] = [
            {"timeUnixNano": str(e.time_ns), "name": e.name}
            | ({"attributes": _otlp_attrs(e.attributes)} if e.attributes else {})
            for e in row.events
        ]
    if row.links:
        span["links"] = [
            {"traceId": link.trace_id, "spanId": link.span_id}
            | ({"traceState": link.trace_state} if link.trace_state else {})
            | ({"attributes": _otlp_attrs(link.attributes)} if link.attributes else {})
            for link in row.links
        ]
    status: dict[str, Any] = {}
    if row.status_message:
        status["message"] = row.status_message
    if _OTLP_STATUS.get(row.status_code, 0):
        status["code"] = _OTLP_STATUS[row.status_code]
    span["status"] = status
    return span


def to_otlp_json(rows: Iterable[SpanRow]) -> dict[str, Any]:
    """Rows as OTLP-JSON ``TracesData`` (``{"resourceSpans": [...]}``): hex ids, enums as
    ints, 64-bit integers as strings; spans grouped by resource, then by scope."""
    resources: dict[Any, dict[Any, list[dict[str, Any]]]] = {}
    resource_attrs: dict[Any, Mapping[str, str]] = {}
    for row in rows:
        rkey = _process_key(row)
        resource_attrs.setdefault(rkey, row.resource_attributes)
        scopes = resources.setdefault(rkey, {})
        scopes.setdefault((row.scope_name, row.scope_version), []).append(_otlp_span(row))
    out = []
    for rkey, scopes in resources.items():
        attrs = resource_attrs[rkey]
        resource = {"attributes": _otlp_attrs(attrs)} if attrs else {}
        scope_spans = []
        for (name, version), spans in scopes.items():
            scope = ({"name": name} if name else {}) | ({"version": version} if version else {})
            scope_spans.append({"scope": scope, "spans": spans})
        out.append({"resource": resource, "scopeSpans": scope_spans})
    return {"resourceSpans": out}


def trace_summaries(rows: Iterable[SpanRow]) -> list[dict[str, Any]]:
    """One summary per trace, shaped as Jaeger's ``/api/v3/trace-summaries``."""
    out = []
    for trace_id, spans in _by_trace(rows).items():
        ids = {s.span_id for s in spans}
        roots = [s for s in spans if not s.parent_span_id or s.parent_span_id not in ids]
        root = min(roots or spans, key=lambda s: (bool(s.parent_span_id), s.start_ns))
        services: dict[str, dict[str, Any]] = {}
        for s in spans:
            entry = services.setdefault(
                s.service_name, {"name": s.service_name, "spanCount": 0, "errorSpanCount": 0}
            )
            entry["spanCount"] += 1
            entry["errorSpanCount"] += s.status_code == "Error"
        out.append(
            {
                "traceId": trace_id,
                "rootServiceName": root.service_name,
                "rootOperationName": root.name,
                "minStartTimeUnixNano": str(min(s.start_ns for s in spans)),
                "maxEndTimeUnixNano": str(max(s.start_ns + s.duration_ns for s in spans)),
                "spanCount": len(spans),
                "errorSpanCount": sum(s.status_code == "Error" for s in spans),
                "services": [services[name] for name in sorted(services)],
            }
        )
    return out


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


def _tag_map(text: str, param: str) -> dict[str, str]:
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
        self._traces = f"{db}.otel_traces"
        self._trace_ts = f"{db}.otel_traces_trace_id_ts"

    def _q(self, sql: str, params: dict[str, Any] | None = None) -> QueryResult:
        return self._store.query(sql, params, True)

    def services(self) -> list[str]:
        res = self._q(
            f"SELECT DISTINCT ServiceName FROM {self._traces} "
            "WHERE ServiceName != '' ORDER BY ServiceName"
        )
        return [r[0] for r in res.rows]

    def operations(self, service: str, span_kind: str = "") -> list[tuple[str, str]]:
        """``(name, jaeger span kind)`` pairs; ``span_kind`` as Jaeger spells it."""
        where, params = ["1"], {}
        if service:
            where.append("ServiceName = {service:String}")
            params["service"] = service
        if span_kind:
            where.append("lower(SpanKind) = {kind:String}")
            params["kind"] = "unspecified" if span_kind == "unspecified" else span_kind.lower()
        res = self._q(
            f"SELECT SpanName, any(SpanKind) FROM {self._traces} WHERE {' AND '.join(where)} "
            "GROUP BY SpanName, SpanKind ORDER BY SpanName, SpanKind",
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
        grouped = _by_trace(SpanRow.from_result(res))
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
            f"FROM (SELECT TraceId, ParentSpanId, ServiceName FROM {self._traces} "
            f"      WHERE ParentSpanId != '' AND {window}) AS c "
            f"INNER JOIN (SELECT TraceId, SpanId, ServiceName FROM {self._traces} "
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


# -- HTTP ------------------------------------------------------------------------------

_HOUR_NS = 3_600_000_000_000
_DAY_MS = 86_400_000


def _v1(data: Any, *, total: int | None = None) -> JSONResponse:
    n = total if total is not None else (len(data) if isinstance(data, list) else 0)
    return JSONResponse({"data": data, "total": n, "limit": 0, "offset": 0, "errors": None})


def _v1_error(status: int, msg: str) -> JSONResponse:
    return JSONResponse(
        {
            "data": None,
            "total": 0,
            "limit": 0,
            "offset": 0,
            "errors": [{"code": status, "msg": msg}],
        },
        status_code=status,
    )


def _v3_error(status: int, msg: str) -> JSONResponse:
    return JSONResponse({"error": {"httpCode": status, "message": msg}}, status_code=status)


def _int_param(params: Mapping[str, str], name: str, default: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise BadParameter(name, f"{raw!r} is not an integer") from exc


def _duration_param(params: Mapping[str, str], name: str) -> int | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        return parse_duration_ns(raw)
    except ValueError as exc:
        raise BadParameter(name, str(exc)) from exc


def _v3_param(params: Mapping[str, str], snake: str) -> str | None:
    """``query.<snake>`` or its camelCase spelling."""
    head, *rest = snake.split("_")
    camel = head + "".join(w.capitalize() for w in rest)
    for name in (f"query.{snake}", f"query.{camel}"):
        if name in params:
            return params[name]
    return None


def _rfc3339_ns(text: str, param: str) -> int:
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise BadParameter(param, f"{text!r} is not an RFC 3339 time") from exc
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    whole = int(value.replace(microsecond=0).timestamp())
    frac = re.search(r"\.(\d+)", text)
    nanos = int(frac.group(1)[:9].ljust(9, "0")) if frac else 0
    return whole * 1_000_000_000 + nanos


def _v1_trace_query(params: Mapping[str, str], tag_params: list[str]) -> TraceQuery:
    service = params.get("service", "")
    if not service:
        raise BadParameter("service", "parameter 'service' is required")
    now_us = time.time_ns() // 1000
    end_us = _int_param(params, "end", now_us)
    start_us = _int_param(params, "start", end_us - _HOUR_NS // 1000)
    if start_us > end_us:
        raise BadParameter("start", "start must not be after end")
    limit = _int_param(params, "limit", 20)
    if limit < 0:
        raise BadParameter("limit", "must not be negative")
    tags: dict[str, str] = {}
    if params.get("tags"):
        tags.update(_tag_map(params["tags"], "tags"))
    for tag in tag_params:
        key, sep, value = tag.partition(":")
        if not sep or not key:
            raise BadParameter("tag", f"{tag!r} is not key:value")
        tags[key] = value
    min_d = _duration_param(params, "minDuration")
    max_d = _duration_param(params, "maxDuration")
    if min_d is not None and max_d is not None and max_d < min_d:
        raise BadParameter("maxDuration", "must not be less than minDuration")
    return TraceQuery(
        start_ns=start_us * 1000,
        end_ns=end_us * 1000,
        service=service,
        operation=params.get("operation", ""),
        min_duration_ns=min_d,
        max_duration_ns=max_d,
        tags=tags,
        limit=limit or 20,
    )


def _v3_trace_query(params: Mapping[str, str]) -> TraceQuery:
    bounds = {}
    for snake in ("start_time_min", "start_time_max"):
        raw = _v3_param(params, snake)
        if not raw:
            raise BadParameter(f"query.{snake}", "is required")
        bounds[snake] = _rfc3339_ns(raw, f"query.{snake}")
    durations = {}
    for snake in ("duration_min", "duration_max"):
        raw = _v3_param(params, snake)
        if raw:
            try:
                durations[snake] = parse_duration_ns(raw)
            except ValueError as exc:
                raise BadParameter(f"query.{snake}", str(exc)) from exc
    depth_raw = _v3_param(params, "search_depth")
    try:
        depth = int(depth_raw) if depth_raw else 100
    except ValueError as exc:
        raise BadParameter("query.search_depth", f"{depth_raw!r} is not an integer") from exc
    if depth <= 0:
        raise BadParameter("query.search_depth", "must be greater than 0")
    attrs_raw = _v3_param(params, "attributes")
    return TraceQuery(
        start_ns=bounds["start_time_min"],
        end_ns=bounds["start_time_max"],
        service=_v3_param(params, "service_name") or "",
        operation=_v3_param(params, "operation_name") or "",
        min_duration_ns=durations.get("duration_min"),
        max_duration_ns=durations.get("duration_max"),
        tags=_tag_map(attrs_raw, "query.attributes") if attrs_raw else {},
        limit=depth,
    )


class _Answer(Exception):
    """Ends a request early with an error answer: ``status`` and ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[..., Awaitable[JSONResponse]]


def _answering(error: Callable[[int, str], JSONResponse]) -> Callable[[Handler], Handler]:
    """A route handler whose failures become ``error`` answers in its API's shape: a
    bad parameter 400, an early :class:`_Answer` its status, a store error 503
    (transient) or 500. The handler itself only returns its success answer."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def answered(*args: Any, **kwargs: Any) -> JSONResponse:
            try:
                return await handler(*args, **kwargs)
            except _Answer as exc:
                return error(exc.status, exc.message)
            except BadParameter as exc:
                return error(400, str(exc))
            except StoreError as exc:
                return error(503 if exc.transient else 500, str(exc))

        return answered

    return wrap


def _trace_id(raw: str, name: str) -> str:
    try:
        return normalize_trace_id(raw)
    except ValueError as exc:
        raise _Answer(400, f"malformed parameter {name}: {exc}") from None


def jaeger_router(store: Store) -> APIRouter:
    """Routes of the v1 JSON API (``/api/...``) and the v3 API (``/api/v3/...``).
    Queries run on worker threads; store errors answer 503 (transient) or 500."""
    reader = JaegerReader(store)
    router = APIRouter()
    v1 = _answering(_v1_error)
    v3 = _answering(_v3_error)

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    # -- v1 --------------------------------------------------------------------------

    @router.get("/api/services")
    @v1
    async def v1_services() -> JSONResponse:
        return _v1(await run(reader.services))

    @router.get("/api/services/{service}/operations")
    @v1
    async def v1_service_operations(service: str) -> JSONResponse:
        return _v1(sorted({name for name, _ in await run(reader.operations, service)}))

    @router.get("/api/operations")
    @v1
    async def v1_operations(request: Request) -> JSONResponse:
        service = request.query_params.get("service", "")
        if not service:
            raise _Answer(400, "parameter 'service' is required")
        kind = request.query_params.get("spanKind", "")
        res = await run(reader.operations, service, kind)
        return _v1([{"name": name, "spanKind": k} for name, k in res])

    @router.get("/api/traces")
    @v1
    async def v1_find_traces(request: Request) -> JSONResponse:
        params = request.query_params
        trace_ids = [_trace_id(t, "traceID") for t in params.getlist("traceID")]
        if trace_ids:
            rows = await run(reader.get_traces, trace_ids)
        else:
            query = _v1_trace_query(params, params.getlist("tag"))
            rows = await run(reader.find_traces, query)
        return _v1(to_jaeger_traces(rows))

    @router.get("/api/traces/{trace_id}")
    @v1
    async def v1_get_trace(trace_id: str) -> JSONResponse:
        rows = await run(reader.get_traces, [_trace_id(trace_id, "traceID")])
        if not rows:
            raise _Answer(404, "trace not found")
        return _v1(to_jaeger_traces(rows))

    @router.get("/api/dependencies")
    @v1
    async def v1_dependencies(request: Request) -> JSONResponse:
        end_ms = _int_param(request.query_params, "endTs", time.time_ns() // 1_000_000)
        lookback_ms = _int_param(request.query_params, "lookback", _DAY_MS)
        if lookback_ms < 0:
            raise BadParameter("lookback", "must not be negative")
        return _v1(await run(reader.dependencies, end_ms * 1_000_000, lookback_ms * 1_000_000))

    # -- v3 --------------------------------------------------------------------------

    @router.get("/api/v3/services")
    @v3
    async def v3_services() -> JSONResponse:
        return JSONResponse({"services": await run(reader.services)})

    @router.get("/api/v3/operations")
    @v3
    async def v3_operations(request: Request) -> JSONResponse:
        params = request.query_params
        service = params.get("service", "")
        kind = params.get("span_kind", params.get("spanKind", ""))
        res = await run(reader.operations, service, kind)
        return JSONResponse({"operations": [{"name": n, "spanKind": k} for n, k in res]})

    @router.get("/api/v3/traces/{trace_id}")
    @v3
    async def v3_get_trace(trace_id: str) -> JSONResponse:
        rows = await run(reader.get_traces, [_trace_id(trace_id, "trace_id")])
        if not rows:
            raise _Answer(404, "trace not found")
        return JSONResponse({"result": to_otlp_json(rows)})

    @router.get("/api/v3/traces")
    @v3
    async def v3_find_traces(request: Request) -> JSONResponse:
        rows = await run(reader.find_traces, _v3_trace_query(request.query_params))
        if not rows:
            raise _Answer(404, "No traces found")
        return JSONResponse({"result": to_otlp_json(rows)})

    @router.get("/api/v3/trace-summaries")
    @v3
    async def v3_trace_summaries(request: Request) -> JSONResponse:
        rows = await run(reader.find_traces, _v3_trace_query(request.query_params))
        return JSONResponse({"summaries": trace_summaries(rows)})

    return router
