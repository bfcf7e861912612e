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

from .convert import to_jaeger_traces, to_otlp_json, trace_summaries
from .http import jaeger_router
from .reader import BadParameter, JaegerReader, TraceQuery, normalize_trace_id, parse_duration_ns
from .rows import SpanEvent, SpanLink, SpanRow, align_clocks, typed_value

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
