"""OTLP trace requests → a column-oriented :class:`SpanBatch`; pure, no I/O.

A request parsed from OTLP/protobuf or OTLP/JSON (:mod:`.otlp_parse`, whose
``parse_*`` and :class:`DecodeError` this module re-exports) goes to
:func:`decode_request`, which validates every span and lays
the good ones out column by column in the OpenTelemetry Collector ClickHouse exporter's
``otel_traces`` layout, plus what derivation needs. Invalid spans are dropped and counted
(OTLP partial success); the rest of the request is kept. So are spans past the limits
below (times, attribute counts, value lengths and depth), which keep one hostile
exporter from storing unbounded rows or failing other exporters' inserts.

An ``llm.decode`` span in packed mode (:mod:`tokentrace.schemas.packed`) is stored
without its packed attribute, and its emissions become one ``token_emissions`` row (five
arrays), stored as they are: the ``otel_traces`` and ``token_latencies`` views expand them
when read into the ``llm.token`` spans and token rows the unpacked mode would have
produced -- span ids derived from the decode span's
(:func:`~tokentrace.schemas.packed.token_span_id`) -- so no per-token Python object, and
no per-token stored row, is ever made.
:func:`.expand.expanded_request` does the same expansion to the protobuf request, for
forwarding.

The collector decodes with :func:`decode_wire`, from the request's bytes: canonical
``llm.token`` spans sent one span each (:mod:`.tokenspans`) become ``token_spans`` rows
in ``batch.tokens`` (the compiled scanner takes them before anything is parsed, when it
is built), read back through the same views as the spans they were.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span, Status

from tokentrace.schemas import SPAN_COLUMNS, TOKEN_EMISSIONS_COLUMNS
from tokentrace.schemas import attributes as attrs
from tokentrace.schemas.attributes import node_of
from tokentrace.schemas.packed import PackedTokens, PackedTokensError, decode_packed

from . import tokenspans
from .otlp_parse import DecodeError, parse_json, parse_protobuf
from .tokenspans import TokenSpans

__all__ = [
    "DecodeError",
    "EARLIEST_NS",
    "MAX_ATTRIBUTES",
    "MAX_EVENTS",
    "MAX_FUTURE_NS",
    "MAX_LINKS",
    "MAX_VALUE_CHARS",
    "MAX_VALUE_DEPTH",
    "OTEL_TRACES_COLUMNS",
    "PACKED_TOKENS_COLUMNS",
    "SpanBatch",
    "accepted_request",
    "decode_request",
    "decode_wire",
    "packed_tokens_of",
    "parse_json",
    "parse_protobuf",
]

# Rejection messages beyond this many are summarised as a count, so one bad exporter
# cannot make a response (or a log line) arbitrarily large.
_MAX_ERROR_MESSAGES = 5

#: A span (or event, or packed token emission) timed before 2000-01-01T00:00:00Z is
#: rejected: no exporter of this system ran then, so such a time is a missing or
#: corrupt clock, and it would land in a partition of its own.
EARLIEST_NS = 946_684_800 * 1_000_000_000
#: ... and so is one timed more than this far (24 h) after the collector's clock:
#: generous for skewed clocks, but it keeps every stored time far below 2**63 ns
#: (year 2262), past which ClickHouse's ``DateTime64(9)`` cannot hold it and the whole
#: insert -- other exporters' spans with it -- would fail.
MAX_FUTURE_NS = 24 * 3600 * 1_000_000_000

_SPAN_KIND = {
    Span.SPAN_KIND_UNSPECIFIED: "Unspecified",
    Span.SPAN_KIND_INTERNAL: "Internal",
    Span.SPAN_KIND_SERVER: "Server",
    Span.SPAN_KIND_CLIENT: "Client",
    Span.SPAN_KIND_PRODUCER: "Producer",
    Span.SPAN_KIND_CONSUMER: "Consumer",
}
_STATUS_CODE = {
    Status.STATUS_CODE_UNSET: "Unset",
    Status.STATUS_CODE_OK: "Ok",
    Status.STATUS_CODE_ERROR: "Error",
}

#: ``otel_spans`` column names in insert order, as :meth:`SpanBatch.otel_spans_columns`
#: returns them (the ``otel_traces`` view's columns too).
OTEL_TRACES_COLUMNS = SPAN_COLUMNS

#: ``token_emissions`` column names, as :attr:`SpanBatch.packed` holds them.
PACKED_TOKENS_COLUMNS = TOKEN_EMISSIONS_COLUMNS


@dataclass
class SpanBatch:
    """Valid spans of one or more export requests, one list per column.

    Every list has one entry per span; the ``llm.token`` spans of packed decode spans are
    not among them but in ``packed``, one ``token_emissions`` row per decode span.
    Timestamps are integer nanoseconds since the Unix epoch; attribute maps hold every
    value as a string (see :func:`any_value_to_str`).
    ``rejected_spans`` / ``errors`` describe the spans that were dropped.
    """

    start_ns: list[int] = field(default_factory=list)
    end_ns: list[int] = field(default_factory=list)
    trace_id: list[str] = field(default_factory=list)
    span_id: list[str] = field(default_factory=list)
    parent_span_id: list[str] = field(default_factory=list)
    trace_state: list[str] = field(default_factory=list)
    name: list[str] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    service_name: list[str] = field(default_factory=list)
    resource_attributes: list[dict[str, str]] = field(default_factory=list)
    scope_name: list[str] = field(default_factory=list)
    scope_version: list[str] = field(default_factory=list)
    attributes: list[dict[str, str]] = field(default_factory=list)
    status_code: list[str] = field(default_factory=list)
    status_message: list[str] = field(default_factory=list)
    event_timestamps_ns: list[list[int]] = field(default_factory=list)
    event_names: list[list[str]] = field(default_factory=list)
    event_attributes: list[list[dict[str, str]]] = field(default_factory=list)
    link_trace_ids: list[list[str]] = field(default_factory=list)
    link_span_ids: list[list[str]] = field(default_factory=list)
    link_trace_states: list[list[str]] = field(default_factory=list)
    link_attributes: list[list[dict[str, str]]] = field(default_factory=list)
    rejected_spans: int = 0
    errors: list[str] = field(default_factory=list)
    # One entry per llm.decode span that arrived packed, as token_emissions columns.
    packed: dict[str, list[Any]] = field(
        default_factory=lambda: {name: [] for name in PACKED_TOKENS_COLUMNS}
    )
    packed_tokens: int = 0  # the llm.token spans those rows expand to
    # Canonical llm.token spans, not among the spans above: token_spans rows.
    tokens: TokenSpans = field(default_factory=TokenSpans)

    @property
    def packed_spans(self) -> int:
        """``llm.decode`` spans that carried packed token emissions."""
        return len(self.packed["trace_id"])

    def __len__(self) -> int:
        return len(self.span_id)

    @property
    def accepted_spans(self) -> int:
        """The valid spans as received: those above and the canonical token spans."""
        return len(self) + self.tokens.rows

    @property
    def expanded_spans(self) -> int:
        """Spans as stored: the valid ones plus the ``llm.token`` spans packed decode
        spans expand to."""
        return self.accepted_spans + self.packed_tokens

    @property
    def error_message(self) -> str:
        """All rejection reasons in one line ('' when nothing was rejected)."""
        if not self.errors:
            return ""
        shown = "; ".join(self.errors[:_MAX_ERROR_MESSAGES])
        more = self.rejected_spans - min(len(self.errors), _MAX_ERROR_MESSAGES)
        return f"{shown}; and {more} more" if more > 0 else shown

    def extend(self, other: SpanBatch) -> None:
        """Append ``other``'s spans and rejections to this batch."""
        for name in _LIST_FIELDS:
            getattr(self, name).extend(getattr(other, name))
        self.rejected_spans += other.rejected_spans
        self.errors.extend(other.errors)
        for name, values in other.packed.items():
            self.packed[name].extend(values)
        self.packed_tokens += other.packed_tokens
        self.tokens.extend(other.tokens)

    def otel_spans_columns(self) -> dict[str, list[Any]]:
        """The batch as ``otel_spans`` insert columns (names as in the table)."""
        return {
            "Timestamp": self.start_ns,
            "TraceId": self.trace_id,
            "SpanId": self.span_id,
            "ParentSpanId": self.parent_span_id,
            "TraceState": self.trace_state,
            "SpanName": self.name,
            "SpanKind": self.kind,
            "ServiceName": self.service_name,
            "ResourceAttributes": self.resource_attributes,
            "ScopeName": self.scope_name,
            "ScopeVersion": self.scope_version,
            "SpanAttributes": self.attributes,
            "Duration": [e - s for s, e in zip(self.start_ns, self.end_ns, strict=True)],
            "StatusCode": self.status_code,
            "StatusMessage": self.status_message,
            "Events.Timestamp": self.event_timestamps_ns,
            "Events.Name": self.event_names,
            "Events.Attributes": self.event_attributes,
            "Links.TraceId": self.link_trace_ids,
            "Links.SpanId": self.link_span_ids,
            "Links.TraceState": self.link_trace_states,
            "Links.Attributes": self.link_attributes,
        }


_LIST_FIELDS = tuple(
    name
    for name in SpanBatch.__dataclass_fields__
    if name not in ("rejected_spans", "errors", "packed", "packed_tokens", "tokens")
)


# -- attribute values ----------------------------------------------------------------

#: Attributes on one span, resource, event or link; and events, and links, on one span:
#: eight times the OpenTelemetry SDKs' default limits (128), so no span an SDK made
#: comes near them, while one span cannot carry unbounded maps into every row.
MAX_ATTRIBUTES = 1024
MAX_EVENTS = 1024
MAX_LINKS = 1024
#: Characters of an attribute value as stored: a string as is (the packed token
#: attribute of an ``llm.decode`` span excepted: it has its own format and checks),
#: bytes as base64, an array or key-value list as compact JSON.
MAX_VALUE_CHARS = 65_536
#: Levels of an attribute value: a scalar is 1, an array of scalars 2, and so on. Well
#: below the protobuf parser's own limit of 100 message levels, which refuses the whole
#: request (binary or JSON) when key-value lists nest 33 levels deep or arrays 49 on a
#: span: up to there, a deep value costs only its own span.
MAX_VALUE_DEPTH = 16


class _Rejected(ValueError):
    """An attribute breaks a limit; the message names the attribute and the limit."""


def _quoted(text: str, limit: int = 64) -> str:
    """``text`` quoted for a rejection message, cut short if it is long: whatever an
    exporter sent, the message stays small."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def any_value_to_str(value: AnyValue) -> str:
    """An attribute value as the string the ``Map(..., String)`` columns hold.

    str as is, int as decimal, double as ``repr``, bool as ``true``/``false``, bytes as
    base64, arrays and key-value lists as compact JSON, unset as ''. Raises ValueError
    for an array or key-value list nested deeper than :data:`MAX_VALUE_DEPTH`, or
    holding more than :data:`MAX_VALUE_CHARS` values in all (its JSON could not be
    shorter than that): both found before any JSON is built.
    """
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "int_value":
        return str(value.int_value)
    if which == "double_value":
        return repr(value.double_value)
    if which == "bool_value":
        return "true" if value.bool_value else "false"
    if which == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    if which in ("array_value", "kvlist_value"):
        # Every value becomes at least one character of JSON, so more values than
        # characters allowed is too long whatever they hold.
        budget = [MAX_VALUE_CHARS]
        doc = _any_value_to_json(value, 1, budget)
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    return ""


def _hex_id(raw: bytes) -> str:
    """An id in hex for a rejection message, cut short if it is far too long."""
    if not raw:
        return "-"
    return raw.hex() if len(raw) <= 32 else f"{raw[:32].hex()}... ({len(raw)} bytes)"


def _any_value_to_json(value: AnyValue, depth: int, budget: list[int]) -> Any:
    if depth > MAX_VALUE_DEPTH:
        raise _Rejected(f"value nested more than {MAX_VALUE_DEPTH} levels deep")
    budget[0] -= 1
    if budget[0] < 0:
        raise _Rejected(f"value longer than {MAX_VALUE_CHARS} characters as JSON")
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "int_value":
        return value.int_value
    if which == "double_value":
        d = value.double_value
        return d if d == d and d not in (float("inf"), float("-inf")) else repr(d)
    if which == "bool_value":
        return value.bool_value
    if which == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    if which == "array_value":
        return [_any_value_to_json(v, depth + 1, budget) for v in value.array_value.values]
    if which == "kvlist_value":
        return {
            kv.key: _any_value_to_json(kv.value, depth + 1, budget)
            for kv in value.kvlist_value.values
        }
    return None


def _attr_map(key_values: Any, where: str, skip: str | None = None) -> dict[str, str]:
    """``key_values`` as a dict of strings; :class:`_Rejected` (naming ``where``) if
    they break a limit. ``skip`` names a key exempt from the length limit."""
    # The hot loop of decoding (every attribute of every span): strings and ints, by far
    # the most common values, without a call per attribute, and the limits checked at
    # the cost of one len() per string.
    if len(key_values) > MAX_ATTRIBUTES:
        raise _Rejected(
            f"{where}: {len(key_values)} attributes, more than the limit of {MAX_ATTRIBUTES}"
        )
    out: dict[str, str] = {}
    kv: KeyValue
    for kv in key_values:
        value = kv.value
        which = value.WhichOneof("value")
        if which == "string_value":
            text = value.string_value
            if len(text) > MAX_VALUE_CHARS and kv.key != skip:
                raise _Rejected(
                    f"{where}[{_quoted(kv.key)}]: value of {len(text)} characters, more than "
                    f"the limit of {MAX_VALUE_CHARS}"
                )
            out[kv.key] = text
        elif which == "int_value":
            out[kv.key] = str(value.int_value)
        else:
            try:
                text = any_value_to_str(value)
            except _Rejected as exc:
                raise _Rejected(f"{where}[{_quoted(kv.key)}]: {exc}") from None
            if len(text) > MAX_VALUE_CHARS:
                raise _Rejected(
                    f"{where}[{_quoted(kv.key)}]: value of {len(text)} characters "
                    f"({which}), more than the limit of {MAX_VALUE_CHARS}"
                )
            out[kv.key] = text
    return out


# -- validation and layout -----------------------------------------------------------


def _check_id(raw: bytes, size: int, field_name: str, *, required: bool) -> str | None:
    """None if ``raw`` is a valid id of ``size`` bytes, else what is wrong with it."""
    if not raw and not required:
        return None
    if len(raw) != size:
        return f"{field_name} must be {size} bytes, got {len(raw)}"
    if raw == bytes(size):
        return f"{field_name} is all zeros" if required else None
    return None


def packed_tokens_of(
    span: Span, latest_ns: int | None = None
) -> tuple[str | None, PackedTokens | None]:
    """``(problem, tokens)`` for an ``llm.decode`` span's packed attribute, if it has one.

    With ``latest_ns``, the token spans it expands to must also lie in the accepted time
    window (times never decrease, so the first and last bound them all).
    """
    if span.name != attrs.SPAN_DECODE:
        return None, None
    for kv in span.attributes:
        if kv.key == attrs.TOKEN_PACKED:
            if kv.value.WhichOneof("value") != "string_value":
                return f"{attrs.TOKEN_PACKED} must be a string", None
            try:
                tokens = decode_packed(kv.value.string_value)
            except PackedTokensError as exc:
                return f"{attrs.TOKEN_PACKED}: {exc}", None
            if latest_ns is not None:
                start = span.start_time_unix_nano
                problem = _time_problem(
                    f"{attrs.TOKEN_PACKED}: first token span start",
                    start + tokens.times[0],
                    latest_ns,
                ) or _time_problem(
                    f"{attrs.TOKEN_PACKED}: last emission", start + tokens.times[-1], latest_ns
                )
                if problem:
                    return problem, None
            return None, tokens
    return None, None


def _utc(ns: int) -> str:
    """``ns`` since the epoch as an ISO 8601 UTC time, for rejection messages."""
    try:
        return datetime.fromtimestamp(ns // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return "out of range"


def _time_problem(field_name: str, ns: int, latest_ns: int) -> str | None:
    """None if ``ns`` lies in the accepted window, else what is wrong with it."""
    if ns < EARLIEST_NS:
        return f"{field_name} {ns} ({_utc(ns)}) is before {_utc(EARLIEST_NS)}"
    if ns > latest_ns:
        return (
            f"{field_name} {ns} ({_utc(ns)}) is more than 24 h after the collector's clock "
            f"({_utc(latest_ns - MAX_FUTURE_NS)})"
        )
    return None


def _span_problem(
    span: Span, events: Sequence[Span.Event], links: Sequence[Span.Link], latest_ns: int
) -> str | None:
    """What is wrong with ``span`` (None if nothing); ``events`` and ``links`` are its
    repeated fields, fetched once by the caller."""
    for problem in (
        _check_id(span.trace_id, 16, "trace_id", required=True),
        _check_id(span.span_id, 8, "span_id", required=True),
        _check_id(span.parent_span_id, 8, "parent_span_id", required=False),
    ):
        if problem:
            return problem
    start = span.start_time_unix_nano
    end = span.end_time_unix_nano
    if start == 0:
        return "start_time_unix_nano is 0 (missing)"
    if end < start:
        return f"end_time_unix_nano {end} < start_time_unix_nano {start}"
    # end >= start, so these two bound both.
    if start < EARLIEST_NS:
        return _time_problem("start_time_unix_nano", start, latest_ns)
    if end > latest_ns:
        return _time_problem("end_time_unix_nano", end, latest_ns)
    if events:
        if len(events) > MAX_EVENTS:
            return f"{len(events)} events, more than the limit of {MAX_EVENTS}"
        for k, event in enumerate(events):
            problem = _time_problem(f"events[{k}].time_unix_nano", event.time_unix_nano, latest_ns)
            if problem:
                return problem
    if links:
        if len(links) > MAX_LINKS:
            return f"{len(links)} links, more than the limit of {MAX_LINKS}"
        for k, link in enumerate(links):
            problem = _check_id(link.trace_id, 16, f"links[{k}].trace_id", required=True) or (
                _check_id(link.span_id, 8, f"links[{k}].span_id", required=True)
            )
            if problem:
                return problem
    return None


# A span's attributes, its events' and its links', as dicts of strings.
_AttributeMaps = tuple[dict[str, str], list[dict[str, str]], list[dict[str, str]]]


def _checked_span(
    span: Span, latest_ns: int
) -> tuple[str | None, PackedTokens | None, _AttributeMaps | None]:
    """``(problem, None, None)`` for a span to reject, else ``(None, packed tokens or
    None, attribute maps)``: the one verdict decode and forwarding both follow. A
    packed decode span's packed attribute is left out of its map: it is stored as rows.
    """
    # Each fetch of a repeated field builds a new wrapper, costing as much as the
    # checks: fetch events and links once per span.
    events = span.events
    links = span.links
    problem = _span_problem(span, events, links, latest_ns)
    if problem:
        return problem, None, None
    tokens = None
    if span.name == attrs.SPAN_DECODE:
        problem, tokens = packed_tokens_of(span, latest_ns)
        if problem:
            return problem, None, None
    try:
        if tokens is None:
            span_attrs = _attr_map(span.attributes, "attributes")
        else:
            span_attrs = _attr_map(span.attributes, "attributes", attrs.TOKEN_PACKED)
            span_attrs.pop(attrs.TOKEN_PACKED, None)
        event_attrs = (
            [_attr_map(e.attributes, f"events[{k}].attributes") for k, e in enumerate(events)]
            if events
            else []
        )
        link_attrs = (
            [_attr_map(x.attributes, f"links[{k}].attributes") for k, x in enumerate(links)]
            if links
            else []
        )
    except _Rejected as exc:
        return str(exc), None, None
    return None, tokens, (span_attrs, event_attrs, link_attrs)


def _resource_attributes(resource_spans: ResourceSpans) -> tuple[str | None, dict[str, str]]:
    """``(problem, attributes)`` of a resource: a problem rejects all its spans."""
    try:
        return None, _attr_map(resource_spans.resource.attributes, "resource.attributes")
    except _Rejected as exc:
        return str(exc), {}


def _latest_ns(now_ns: int | None) -> int:
    return (time.time_ns() if now_ns is None else now_ns) + MAX_FUTURE_NS


def decode_wire(
    wire: bytes, *, now_ns: int | None = None, compiled: bool | None = None
) -> SpanBatch:
    """Parse and decode one serialized ``ExportTraceServiceRequest`` as the collector
    stores it: :func:`decode_request`, with canonical ``llm.token`` spans
    (:mod:`.tokenspans`) as ``token_spans`` rows in ``batch.tokens``.

    The compiled scanner takes those spans out of ``wire`` first when it is built
    (``compiled``: None uses it if it is, False never); the rows are the same either
    way. Raises :class:`DecodeError` as :func:`parse_protobuf` does.
    """
    latest_ns = _latest_ns(now_ns)
    if tokenspans.COMPILED and compiled is not False:
        found = tokenspans.compiled_scan(wire, EARLIEST_NS, latest_ns)
        if found is not None:
            batch = _decode_residual(found, latest_ns)
            if batch is not None:
                return batch
    return _decode(parse_protobuf(wire), latest_ns, typed_tokens=True)


def _decode_residual(found: Any, latest_ns: int) -> SpanBatch | None:
    """The batch of a request the scanner took token spans from, or None when the
    request must be decoded whole in Python: its residual does not parse (the whole
    request is then refused, with the message for all of it), or a resource holding
    token spans is invalid (they are rejected with it, one message each)."""
    residual, rows, columns, found_runs, kept = found
    try:
        request = parse_protobuf(residual)
    except DecodeError:
        return None
    runs: list[tokenspans.Run] = []
    resources: dict[int, dict[str, str]] = {}
    for r, s, n in found_runs:
        if r not in resources:
            problem, resource_attrs = _resource_attributes(request.resource_spans[r])
            if problem:
                return None
            resources[r] = resource_attrs
        resource_attrs = resources[r]
        scope = request.resource_spans[r].scope_spans[s].scope
        runs.append(
            (
                resource_attrs.get(attrs.SERVICE_NAME, ""),
                resource_attrs,
                scope.name,
                scope.version,
                node_of(resource_attrs),
                n,
            )
        )
    batch = SpanBatch()
    batch.tokens.add(columns, rows, runs)
    return _decode(request, latest_ns, typed_tokens=True, span_index=kept, batch=batch)


def decode_request(request: ExportTraceServiceRequest, *, now_ns: int | None = None) -> SpanBatch:
    """Validate and lay out every span of ``request``; never raises for bad spans.

    A span is dropped when it has a wrong-length or all-zero trace/span id, a
    wrong-length parent id or link id, a missing start time, or an end before its
    start; a start, end, event or packed token time before :data:`EARLIEST_NS` or more
    than :data:`MAX_FUTURE_NS` after ``now_ns`` (the collector's clock,
    ``time.time_ns()`` when None); more than :data:`MAX_EVENTS` events or
    :data:`MAX_LINKS` links; more than :data:`MAX_ATTRIBUTES` attributes on it, an
    event or a link, or on its resource; or an attribute value longer than
    :data:`MAX_VALUE_CHARS` or nested deeper than :data:`MAX_VALUE_DEPTH`. The batch
    counts it in ``rejected_spans`` and says why in ``errors`` (naming the field, the
    span's position, name and id). The result depends on nothing but ``request`` and
    ``now_ns``, so replaying an export with the ``now_ns`` it was first accepted at
    decodes it the same way. Every valid span is in the batch's span columns
    (:func:`decode_wire` is what stores token spans apart).
    """
    return _decode(request, _latest_ns(now_ns), typed_tokens=False)


def _decode(
    request: ExportTraceServiceRequest,
    latest_ns: int,
    *,
    typed_tokens: bool,
    span_index: dict[tuple[int, int], list[int]] | None = None,
    batch: SpanBatch | None = None,
) -> SpanBatch:
    """:func:`decode_request` into ``batch`` (a new one if None); with ``typed_tokens``,
    canonical token spans go to ``batch.tokens``. ``span_index`` gives, for a scope the
    scanner took spans from, the original index of each span left (for messages)."""
    if batch is None:
        batch = SpanBatch()
    twin = tokenspans.TwinRows() if typed_tokens else None
    problem: str | None
    tokens: PackedTokens | None
    maps: _AttributeMaps | None
    for r, resource_spans in enumerate(request.resource_spans):
        resource_problem, resource_attrs = _resource_attributes(resource_spans)
        service_name = resource_attrs.get(attrs.SERVICE_NAME, "")
        for s, scope_spans in enumerate(resource_spans.scope_spans):
            scope_name = scope_spans.scope.name
            scope_version = scope_spans.scope.version
            for i, span in enumerate(scope_spans.spans):
                if resource_problem:
                    problem, tokens, maps = resource_problem, None, None
                else:
                    if twin is not None and span.name == attrs.SPAN_TOKEN:
                        values = tokenspans.token_values(span, EARLIEST_NS, latest_ns)
                        if values is not None:
                            run = (
                                service_name,
                                resource_attrs,
                                scope_name,
                                scope_version,
                                node_of(resource_attrs),
                                0,
                            )
                            twin.add(span, values, (r, s), run)
                            continue
                    problem, tokens, maps = _checked_span(span, latest_ns)
                if maps is None:
                    batch.rejected_spans += 1
                    if len(batch.errors) < _MAX_ERROR_MESSAGES:
                        if span_index is not None and (r, s) in span_index:
                            i = span_index[(r, s)][i]
                        batch.errors.append(
                            f"span resource_spans[{r}].scope_spans[{s}].spans[{i}] "
                            f"name={_quoted(span.name)} span_id={_hex_id(span.span_id)}: "
                            f"{problem}"
                        )
                    continue
                _append_span(
                    batch, span, maps, resource_attrs, service_name, scope_name, scope_version
                )
                if tokens is not None:
                    _append_packed(batch, tokens)
    if twin is not None and twin.rows:
        batch.tokens.add(twin.buffers(), twin.rows, twin.runs)
    return batch


def accepted_request(
    request: ExportTraceServiceRequest, *, now_ns: int | None = None
) -> ExportTraceServiceRequest:
    """A copy of ``request`` without the spans :func:`decode_request` rejects at the same
    ``now_ns`` (scopes and resources left empty are removed too); ``request`` itself is
    not modified."""
    latest_ns = _latest_ns(now_ns)
    out = ExportTraceServiceRequest()
    out.CopyFrom(request)
    for r in range(len(out.resource_spans) - 1, -1, -1):
        resource_spans = out.resource_spans[r]
        if _resource_attributes(resource_spans)[0]:
            del out.resource_spans[r]
            continue
        for s in range(len(resource_spans.scope_spans) - 1, -1, -1):
            spans = resource_spans.scope_spans[s].spans
            for i in range(len(spans) - 1, -1, -1):
                if _checked_span(spans[i], latest_ns)[0]:
                    del spans[i]
            if not spans:
                del resource_spans.scope_spans[s]
        if not resource_spans.scope_spans:
            del out.resource_spans[r]
    return out


def _append_span(
    batch: SpanBatch,
    span: Span,
    maps: _AttributeMaps,
    resource_attrs: dict[str, str],
    service_name: str,
    scope_name: str,
    scope_version: str,
) -> None:
    batch.start_ns.append(span.start_time_unix_nano)
    batch.end_ns.append(span.end_time_unix_nano)
    batch.trace_id.append(span.trace_id.hex())
    batch.span_id.append(span.span_id.hex())
    batch.parent_span_id.append(span.parent_span_id.hex())
    batch.trace_state.append(span.trace_state)
    batch.name.append(span.name)
    batch.kind.append(_SPAN_KIND.get(span.kind, "Unspecified"))
    batch.service_name.append(service_name)
    batch.resource_attributes.append(resource_attrs)
    batch.scope_name.append(scope_name)
    batch.scope_version.append(scope_version)
    span_attrs, event_attrs, link_attrs = maps
    batch.attributes.append(span_attrs)
    status = span.status
    batch.status_code.append(_STATUS_CODE.get(status.code, "Unset"))
    batch.status_message.append(status.message)
    if event_attrs:
        events = span.events
        batch.event_timestamps_ns.append([e.time_unix_nano for e in events])
        batch.event_names.append([e.name for e in events])
        batch.event_attributes.append(event_attrs)
    else:
        batch.event_timestamps_ns.append([])
        batch.event_names.append([])
        batch.event_attributes.append([])
    if link_attrs:
        links = span.links
        batch.link_trace_ids.append([link.trace_id.hex() for link in links])
        batch.link_span_ids.append([link.span_id.hex() for link in links])
        batch.link_trace_states.append([link.trace_state for link in links])
        batch.link_attributes.append(link_attrs)
    else:
        batch.link_trace_ids.append([])
        batch.link_span_ids.append([])
        batch.link_trace_states.append([])
        batch.link_attributes.append([])


# -- packed tokens -------------------------------------------------------------------


def _append_packed(batch: SpanBatch, tokens: PackedTokens) -> None:
    """A ``token_emissions`` row for the decode span just appended to ``batch``."""
    p = batch.packed
    p["decode_start"].append(batch.start_ns[-1])
    p["trace_id"].append(batch.trace_id[-1])
    p["decode_span_id"].append(batch.span_id[-1])
    p["service_name"].append(batch.service_name[-1])
    p["resource_attributes"].append(batch.resource_attributes[-1])
    p["scope_name"].append(batch.scope_name[-1])
    p["scope_version"].append(batch.scope_version[-1])
    p["node"].append(node_of(batch.resource_attributes[-1]))
    p["times"].append(tokens.times)
    p["steps"].append(tokens.steps)
    p["counts"].append(tokens.counts)
    p["batch_sizes"].append(tokens.batch_sizes)
    # A version 1 payload reported no prefill counts: NULL per emission, not 0.
    prefill = tokens.prefill_tokens
    p["prefill_tokens"].append([None] * len(tokens) if prefill is None else prefill)
    batch.packed_tokens += len(tokens)
