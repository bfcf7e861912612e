"""A terminal waterfall of one trace: nodes as lanes, token spans condensed.

Pure: rows in (as ``tokentrace trace`` reads them from otel_traces), a rich renderable
out. Times are shown relative to the trace's first span, in milliseconds, on the
router's clock (:mod:`.clockalign`); a span moved there says by how much.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Any

from rich.table import Table
from rich.text import Text

from tokentrace.schemas import attributes as A

from .clockalign import TimedSpan, clock_shifts

__all__ = ["TraceSpan", "render_waterfall", "TRACE_SQL"]

# {trace_id} is validated (32 lowercase hex) before it is formatted in. The trace-id →
# time table narrows the read to the trace's time window.
TRACE_SQL = f"""
SELECT SpanName, SpanKind, ServiceName, {A.node_sql()} AS node,
       SpanId, ParentSpanId, toUnixTimestamp64Nano(Timestamp) AS start_ns, Duration,
       StatusCode, SpanAttributes
FROM tokentrace.otel_traces
WHERE TraceId = '{{trace_id}}'
  AND Timestamp >= (SELECT min(Start) FROM tokentrace.otel_traces_trace_id_ts
                    WHERE TraceId = '{{trace_id}}')
  AND Timestamp <= (SELECT max(End) + INTERVAL 1 SECOND FROM tokentrace.otel_traces_trace_id_ts
                    WHERE TraceId = '{{trace_id}}')
ORDER BY Timestamp
"""

_BAR_WIDTH = 48


@dataclass(frozen=True)
class TraceSpan:
    name: str
    kind: str
    service: str
    node: str
    start_ns: int
    duration_ns: int
    status: str
    attributes: dict[str, str]
    span_id: str = ""
    parent_span_id: str = ""
    clock_shift_ns: int = 0

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TraceSpan:
        return cls(
            name=str(row["SpanName"]),
            kind=str(row["SpanKind"]),
            service=str(row["ServiceName"]),
            node=str(row["node"]),
            start_ns=int(row["start_ns"]),
            duration_ns=int(row["Duration"]),
            status=str(row["StatusCode"]),
            attributes=dict(row.get("SpanAttributes") or {}),
            span_id=str(row.get("SpanId") or ""),
            parent_span_id=str(row.get("ParentSpanId") or ""),
        )

    @property
    def end_ns(self) -> int:
        return self.start_ns + self.duration_ns


def _bar(start_ns: int, end_ns: int, t0: int, total_ns: int, style: str) -> Text:
    scale = _BAR_WIDTH / max(total_ns, 1)
    left = min(round((start_ns - t0) * scale), _BAR_WIDTH - 1)
    right = min(round((end_ns - t0) * scale), _BAR_WIDTH)
    width = max(1, right - left)
    return (
        Text(" " * left) + Text("█" * width, style=style) + Text(" " * (_BAR_WIDTH - left - width))
    )


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.2f}"


def align(spans: list[TraceSpan]) -> list[TraceSpan]:
    """``spans`` moved onto the router's clock, each remembering how far it moved."""
    shifts = clock_shifts(
        [
            TimedSpan(s.span_id, s.parent_span_id, s.node, s.name, s.start_ns, s.attributes)
            for s in spans
        ]
    )
    return [
        replace(s, start_ns=s.start_ns + shifts[s.span_id], clock_shift_ns=shifts[s.span_id])
        if s.span_id in shifts
        else s
        for s in spans
    ]


def _detail(span: TraceSpan) -> str:
    text = _what(span)
    if span.clock_shift_ns:
        moved = f"clock {span.clock_shift_ns / 1e6:+.2f} ms"
        text = f"{text} · {moved}" if text else moved
    return text


def _what(span: TraceSpan) -> str:
    a = span.attributes
    if span.name == A.SPAN_KV_TRANSFER and A.KV_BYTES in a:
        return f"{int(a[A.KV_BYTES]) / 1024:.0f} KiB from {a.get(A.KV_SRC_NODE, '?')}"
    if span.name == A.SPAN_REQUEST and A.GEN_AI_SERVER_TTFT in a:
        return f"TTFT {float(a[A.GEN_AI_SERVER_TTFT]) * 1000:.2f} ms"
    if A.GEN_AI_USAGE_OUTPUT_TOKENS in a:
        return f"{a[A.GEN_AI_USAGE_OUTPUT_TOKENS]} tokens"
    return ""


def render_waterfall(trace_id: str, spans: list[TraceSpan]) -> Table:
    """One row per span, grouped by node in order of first appearance; each node's
    ``llm.token`` spans become one row with their count and ITL statistics."""
    spans = align(spans)
    t0 = min(s.start_ns for s in spans)
    total = max(s.end_ns for s in spans) - t0
    table = Table(
        title=f"trace {trace_id} — {len(spans)} spans, {_ms(total)} ms",
        title_justify="left",
    )
    for header, justify in (
        ("node", "left"),
        ("span", "left"),
        ("start ms", "right"),
        ("dur ms", "right"),
        ("timeline", "left"),
        ("", "left"),
    ):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    nodes: list[str] = []
    for s in spans:
        if s.node not in nodes:
            nodes.append(s.node)
    for node in nodes:
        lane = [s for s in spans if s.node == node]
        tokens = [s for s in lane if s.name == A.SPAN_TOKEN]
        for s in lane:
            if s.name == A.SPAN_TOKEN:
                continue
            style = "red" if s.status == "Error" else "cyan"
            table.add_row(
                node,
                s.name,
                _ms(s.start_ns - t0),
                _ms(s.duration_ns),
                _bar(s.start_ns, s.end_ns, t0, total, style),
                _detail(s),
            )
            node = ""  # name the lane once
        if tokens:
            gaps = [
                t.duration_ns
                for t in tokens
                if t.attributes.get(A.EMISSION_INDEX, t.attributes.get(A.TOKEN_INDEX)) != "0"
            ]
            count = sum(int(t.attributes.get(A.TOKEN_COUNT, "1")) for t in tokens)
            stats = (
                f"ITL p50 {_ms(statistics.median(gaps))} / max {_ms(max(gaps))} ms"
                if gaps
                else "one emission"
            )
            first, last = min(t.start_ns for t in tokens), max(t.end_ns for t in tokens)
            table.add_row(
                node,
                f"{A.SPAN_TOKEN} ×{len(tokens)}",
                _ms(first - t0),
                _ms(last - first),
                _bar(first, last, t0, total, "green"),
                f"{count} tokens, {stats}",
            )
    return table
