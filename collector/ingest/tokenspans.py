"""Canonical ``llm.token`` spans as ``token_spans`` rows: the shape, its two readers, its
columns.

One span per token emission is the unpacked mode's hot input: a decode node sends tens
of thousands a second, all of one shape (:func:`token_values` says which). Such a span
is stored as a ``token_spans`` row, its attributes typed columns, and the
``otel_traces`` and ``token_latencies`` views give back exactly the span and token row
it would have made stored in ``otel_spans`` (tested: identical rows both ways). Any span
not of that shape is decoded and stored as every other span is.

Two readers find them, with the same rows:

- the compiled scanner (``_tokenscan.c``, built at install when a C compiler is there)
  reads them straight from the request's bytes and hands the rest of the request, a
  *residual*, to the general decoder -- no Python object per token span;
- the pure-Python twin, :func:`token_values` on the parsed request, used when the
  scanner is not built (or ``TOKENTRACE_PURE_PYTHON=1``), and for any span the scanner
  left in the residual (it is stricter about the bytes than the parsed message shows).

:class:`TokenSpans` holds the rows column by column in ClickHouse's Native layout,
which is what the scanner writes and what the store inserts as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tokentrace.schemas import TOKEN_SPANS_COLUMNS
from tokentrace.schemas import attributes as attrs

from ..native import Column, Encoded, Repeated

__all__ = [
    "COMPILED",
    "TOKEN_KEYS",
    "TokenSpans",
    "compiled_scan",
    "resource_id",
    "token_values",
]

#: The attributes of a canonical token span, in the order its emitters set them
#: (``instrument/recorder.py``); the last may be missing (an emitter that does not know
#: its steps' prefill work).
TOKEN_KEYS = (
    attrs.EMISSION_INDEX,
    attrs.TOKEN_INDEX,
    attrs.TOKEN_COUNT,
    attrs.ENGINE_STEP,
    attrs.BATCH_SIZE,
    attrs.STEP_PREFILL_TOKENS,
)


def _load_scanner() -> Any:
    if os.environ.get("TOKENTRACE_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from . import _tokenscan  # type: ignore[attr-defined]
    except ImportError:
        return None
    if tuple(_tokenscan.TOKEN_KEYS) != TOKEN_KEYS:  # built from an older source
        return None
    return _tokenscan


_scanner = _load_scanner()
#: Whether the compiled scanner is in use (a collector's ``collector.json`` says which,
#: as ``token_scanner``).
COMPILED = _scanner is not None


def compiled_scan(wire: bytes, earliest_ns: int, latest_ns: int) -> Any:
    """The compiled scanner's answer for ``wire`` (see ``_tokenscan.c``): None, or
    ``(residual, rows, columns, runs, kept)``. Only call it when :data:`COMPILED`."""
    return _scanner.scan(wire, earliest_ns, latest_ns)


_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)
_INTERNAL = Span.SPAN_KIND_INTERNAL


def token_values(span: Span, earliest_ns: int, latest_ns: int) -> list[int] | None:
    """The token attributes' values of ``span`` if it is a canonical token span, else
    None: named ``llm.token``, kind INTERNAL, no trace state, events or links, status
    unset; a 16-byte trace id and 8-byte span and parent ids, none all zeros; a start
    neither 0 nor before ``earliest_ns``, an end neither before it nor after
    ``latest_ns``; and exactly the attributes :data:`TOKEN_KEYS` (the first five or all
    six) in that order, each an int. Such a span is one the general decoder accepts, and
    its row reads back as that decoder's row would."""
    if span.name != attrs.SPAN_TOKEN or span.kind != _INTERNAL or span.trace_state:
        return None
    attributes = span.attributes
    n = len(attributes)
    if n != 5 and n != 6:
        return None
    values = []
    for kv, key in zip(attributes, TOKEN_KEYS, strict=False):
        if kv.key != key:
            return None
        value = kv.value
        if value.WhichOneof("value") != "int_value":
            return None
        values.append(value.int_value)
    if span.events or span.links:
        return None
    status = span.status
    if status.code or status.message:
        return None
    trace_id, span_id, parent = span.trace_id, span.span_id, span.parent_span_id
    if len(trace_id) != 16 or trace_id == _ZERO_TRACE:
        return None
    if len(span_id) != 8 or span_id == _ZERO_SPAN or len(parent) != 8 or parent == _ZERO_SPAN:
        return None
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    if start == 0 or start < earliest_ns or end < start or end > latest_ns:
        return None
    return values


# The scanner's columns, in its order: the Native layout of these token_spans columns
# (StepPrefillTokens as its null map, then its values).
_BUFFERS = (
    ("Timestamp", "DateTime64(9)"),
    ("Duration", "UInt64"),
    ("TraceId", "String"),
    ("SpanId", "String"),
    ("ParentSpanId", "String"),
    ("EmissionIndex", "Int64"),
    ("TokenIndex", "Int64"),
    ("TokenCount", "Int64"),
    ("EngineStep", "Int64"),
    ("BatchSize", "Int64"),
    ("StepPrefillTokens", "Nullable(Int64)"),  # null map
    ("StepPrefillTokens", "Nullable(Int64)"),  # values
)
_BIG_ENDIAN = sys.byteorder != "little"

#: One run of rows from one resource and scope: service name, resource attributes,
#: scope name, scope version, node, rows.
Run = tuple[str, dict[str, str], str, str, str, int]


def resource_id(resource_attributes: dict[str, str], scope_name: str, scope_version: str) -> int:
    """The ``ResourceId`` of a resource and scope: a 64-bit hash of them, attributes in
    their order (the order the span would be stored with)."""
    text = json.dumps([list(resource_attributes.items()), scope_name, scope_version])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@dataclass
class TokenSpans:
    """Canonical token spans as ``token_spans`` columns: chunks of Native column bytes
    (one per scan) and the runs of resource and scope they belong to, in row order."""

    rows: int = 0
    chunks: list[tuple[bytes, ...]] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)

    def add(self, columns: tuple[bytes, ...], rows: int, runs: list[Run]) -> None:
        """Append a scan's rows: its column buffers and their runs."""
        if rows:
            self.chunks.append(columns)
            self.runs.extend(runs)
            self.rows += rows

    def extend(self, other: TokenSpans) -> None:
        self.chunks.extend(other.chunks)
        self.runs.extend(other.runs)
        self.rows += other.rows

    def columns(self) -> dict[str, Column]:
        """The rows as ``token_spans`` insert columns, in table order."""
        joined = [b"".join(chunk[i] for chunk in self.chunks) for i in range(len(_BUFFERS))]
        out: dict[str, Column] = {}
        for i, (name, wire) in enumerate(_BUFFERS[:-2]):
            out[name] = Encoded(joined[i], self.rows, wire)
        out["StepPrefillTokens"] = Encoded(joined[-2] + joined[-1], self.rows, _BUFFERS[-1][1])
        out["ServiceName"] = Repeated([(run[0], run[-1]) for run in self.runs])
        out["Node"] = Repeated([(run[4], run[-1]) for run in self.runs])
        out["ResourceId"] = Repeated([(resource_id(*run[1:4]), run[-1]) for run in self.runs])
        return {name: out[name] for name in TOKEN_SPANS_COLUMNS}

    def resources(self) -> dict[str, list[Any]]:
        """The distinct resources and scopes of the rows, as ``token_span_resources``
        insert columns."""
        seen: dict[int, tuple[dict[str, str], str, str]] = {}
        for run in self.runs:
            seen.setdefault(resource_id(*run[1:4]), run[1:4])
        return {
            "ResourceId": list(seen),
            "ResourceAttributes": [r[0] for r in seen.values()],
            "ScopeName": [r[1] for r in seen.values()],
            "ScopeVersion": [r[2] for r in seen.values()],
        }


class TwinRows:
    """Canonical token spans found in a parsed request (the pure-Python twin), gathered
    into the same column buffers the scanner writes."""

    def __init__(self) -> None:
        self.rows = 0
        self._ints: list[array] = [array("q") for _ in range(7)]  # ts, dur, 5 values
        self._prefill = array("q")
        self._nulls = bytearray()
        self._ids: list[list[bytes]] = [[], [], []]
        self.runs: list[Run] = []
        self._run_key: tuple[int, int] | None = None

    def add(self, span: Span, values: list[int], where: tuple[int, int], run: Run) -> None:
        """One canonical span with its :func:`token_values`, found at ``where`` (its
        resource and scope index) whose run is ``run`` (its count is kept here)."""
        ints = self._ints
        start = span.start_time_unix_nano
        ints[0].append(start)
        ints[1].append(span.end_time_unix_nano - start)
        for k in range(5):
            ints[2 + k].append(values[k])
        if len(values) > 5:
            self._nulls.append(0)
            self._prefill.append(values[5])
        else:
            self._nulls.append(1)
            self._prefill.append(0)
        for ids, raw in zip(
            self._ids, (span.trace_id, span.span_id, span.parent_span_id), strict=True
        ):
            ids.append(raw)
        if self._run_key == where:
            service, resource, scope, version, node, n = self.runs[-1]
            self.runs[-1] = (service, resource, scope, version, node, n + 1)
        else:
            self.runs.append((*run[:5], 1))
            self._run_key = where
        self.rows += 1

    def buffers(self) -> tuple[bytes, ...]:
        """The rows as the scanner lays them out (see :data:`_BUFFERS`)."""

        def fixed(values: array) -> bytes:
            if _BIG_ENDIAN:
                values = array(values.typecode, values)
                values.byteswap()
            return values.tobytes()

        def hexes(ids: list[bytes]) -> bytes:
            return b"".join(bytes((2 * len(raw),)) + raw.hex().encode() for raw in ids)

        ts, dur, *vals = (fixed(a) for a in self._ints)
        return (
            ts,
            dur,
            *(hexes(ids) for ids in self._ids),
            *vals,
            bytes(self._nulls),
            fixed(self._prefill),
        )
