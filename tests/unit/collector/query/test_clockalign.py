"""clockalign: the shifts that put one trace's spans on the router's clock."""

from __future__ import annotations

from tokentrace.collector.query.clockalign import TimedSpan, clock_shifts
from tokentrace.schemas import attributes as A

MS = 1_000_000


def _span(sid: str, parent: str, node: str, name: str, start_ms: float, **attrs: str) -> TimedSpan:
    return TimedSpan(sid, parent, node, name, round(start_ms * MS), attrs)


def _trace(p_off: str | None, d_off: str | None) -> list[TimedSpan]:
    attrs = {A.PREFILL_NODE: "p", A.DECODE_NODE: "d"}
    if p_off is not None:
        attrs[A.PREFILL_CLOCK_OFFSET_S] = p_off
    if d_off is not None:
        attrs[A.DECODE_CLOCK_OFFSET_S] = d_off
    # True times (router clock): request 0, prefill 1, decode 30, transfer 31, tokens 32+.
    # The prefill node's clock is 50 ms slow, the decode node's 80 ms fast.
    return [
        _span("r", "", "router", A.SPAN_REQUEST, 0, **attrs),
        _span("p", "r", "p", A.SPAN_PREFILL, 1 - 50),
        _span("d", "r", "d", A.SPAN_DECODE, 30 + 80),
        _span("k", "d", "d", A.SPAN_KV_TRANSFER, 31 + 80),
        _span("t", "d", "d", A.SPAN_TOKEN, 32 + 80),
    ]


def test_offsets_from_the_router_span_move_whole_nodes() -> None:
    shifts = clock_shifts(_trace("-0.05", "0.08"))
    assert shifts == {"p": 50 * MS, "d": -80 * MS, "k": -80 * MS, "t": -80 * MS}


def test_without_an_offset_a_child_is_moved_to_its_parent_start() -> None:
    # No estimate for the prefill node: its span (49 ms before the request) moves to the
    # request's start; the decode node's estimate is a little off but keeps it after.
    shifts = clock_shifts(_trace(None, "0.0805"))
    assert shifts["p"] == 49 * MS
    assert shifts["d"] == shifts["k"] == shifts["t"] == -80_500_000


def test_same_node_children_keep_their_distance_and_reference_nodes_never_move() -> None:
    # The router reports an offset for a "worker" on its own node: ignored.
    attrs = {A.DECODE_NODE: "router", A.DECODE_CLOCK_OFFSET_S: "1"}
    spans = [
        _span("r", "", "router", A.SPAN_REQUEST, 0, **attrs),
        _span("c", "r", "router", "child", -5),  # same node: never moved, even if earlier
        _span("x", "missing", "d", A.SPAN_DECODE, 7),  # orphan, no estimate: stays
    ]
    assert clock_shifts(spans) == {}


def test_bad_offsets_are_ignored() -> None:
    for bad in ("fast", "nan", "1e300", ""):
        assert clock_shifts(_trace(bad, None)) == {"p": 49 * MS}
