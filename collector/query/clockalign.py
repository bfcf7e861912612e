"""Put the spans of one trace on one clock: the router's, then never before their parent.

A trace's spans come from several nodes whose clocks disagree. The router's
``llm.request`` span carries its estimate of the prefill and decode workers' clock
offsets (:mod:`tokentrace.instrument.clock`); every span of such a node moves by minus
that offset. Then, as Jaeger's own clock-skew adjuster does, a span whose parent runs on
another node and which still starts before that parent moves (with its same-node
descendants) to the parent's start: what remains of the skew is within the offset's
error. Spans on the parent's node are never moved relative to it, so intervals
measured on one node stay exactly as that node measured them.

Pure: spans in, a shift per span id out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tokentrace.schemas import attributes as A

__all__ = ["TimedSpan", "clock_shifts"]

_NODE_OFFSETS = (
    (A.PREFILL_NODE, A.PREFILL_CLOCK_OFFSET_S),
    (A.DECODE_NODE, A.DECODE_CLOCK_OFFSET_S),
)


@dataclass(frozen=True)
class TimedSpan:
    span_id: str
    parent_span_id: str
    node: str
    name: str
    start_ns: int
    attributes: Mapping[str, str]


def _offset_ns(raw: str | None) -> int | None:
    try:
        value = float(raw) if raw else None
    except ValueError:
        return None
    if value is None or value != value or abs(value) > 1e6:
        return None
    return round(value * 1e9)


def _node_shifts(spans: Sequence[TimedSpan]) -> dict[str, int]:
    """Node → shift onto the router's clock, from the trace's ``llm.request`` spans."""
    references = {s.node for s in spans if s.name == A.SPAN_REQUEST}
    shifts: dict[str, int] = {}
    for span in spans:
        if span.name != A.SPAN_REQUEST:
            continue
        for node_attr, offset_attr in _NODE_OFFSETS:
            node = span.attributes.get(node_attr)
            offset = _offset_ns(span.attributes.get(offset_attr))
            if node and offset is not None and node not in references:
                shifts.setdefault(node, -offset)
    return shifts


def clock_shifts(spans: Sequence[TimedSpan]) -> dict[str, int]:
    """Span id → nanoseconds to add to its times (only spans that move)."""
    node_shift = _node_shifts(spans)
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[TimedSpan]] = {}
    roots: list[TimedSpan] = []
    for span in spans:
        if span.parent_span_id and span.parent_span_id in by_id:
            children.setdefault(span.parent_span_id, []).append(span)
        else:
            roots.append(span)
    shift: dict[str, int] = {}
    stack = []
    for root in roots:
        shift[root.span_id] = node_shift.get(root.node, 0)
        stack.append(root)
    while stack:
        parent = stack.pop()
        parent_start = parent.start_ns + shift[parent.span_id]
        for child in children.get(parent.span_id, ()):
            if child.span_id in shift:  # a repeated id: keep the first placement
                continue
            if child.node == parent.node:
                moved = shift[parent.span_id]
            else:
                moved = node_shift.get(child.node, 0)
                if child.start_ns + moved < parent_start:
                    moved = parent_start - child.start_ns
            shift[child.span_id] = moved
            stack.append(child)
    return {span_id: ns for span_id, ns in shift.items() if ns}
