"""Stored spans as :class:`SpanRow`, moved onto one clock (:func:`align_clocks`), and
stored attribute strings typed back (:func:`typed_value`): ``true``/``false`` → bool, a
decimal integer → int64, a float literal → float64, anything else → string."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tokentrace.schemas import attributes as A
from tokentrace.schemas.attributes import node_of

from ...ingest.decode import OTEL_TRACES_COLUMNS
from ...store import QueryResult
from ..clockalign import TimedSpan, clock_shifts

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT_RE = re.compile(r"-?(?:0|[1-9][0-9]*)")
_FLOAT_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+(?:e[+-][0-9]+)?|e[+-][0-9]+)")
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


def group_by_trace(rows: Iterable[SpanRow]) -> dict[str, list[SpanRow]]:
    """Rows by trace id, each trace's rows in the order given."""
    grouped: dict[str, list[SpanRow]] = {}
    for row in rows:
        grouped.setdefault(row.trace_id, []).append(row)
    return grouped


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
