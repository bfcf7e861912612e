"""Property: whatever mix of valid and invalid spans an export carries, a real collector
stores exactly the valid ones and reports every invalid one.

Hypothesis draws exports of one to three resources, each with spans that are valid
(plain, with events and links, packed ``llm.decode``, or at a limit's very edge) or
broken in one of the ways the collector rejects a single span (bad ids, end before
start, times out of the window, too many attributes or events, too long or too deep a
value, a bad link, packed-token garbage), and now and then a resource with too many
attributes, which rejects all its spans. Each export goes over OTLP/HTTP protobuf,
OTLP/HTTP JSON or OTLP/gRPC to one collector process; the answer must be a success whose
``partial_success.rejected_spans`` counts exactly the spans meant to be rejected, and
``otel_traces`` must hold exactly the valid spans (and the token spans their packed
attributes expand to) under the example's fresh trace ids.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from collector_process import Running, running_collector
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span
from otlp_payloads import (
    HOUR_NS,
    PROTOBUF,
    Answer,
    export_grpc,
    nest,
    new_trace_id,
    post,
    span,
    stored_span_ids,
    to_json,
)

from tokentrace.collector.ingest.decode import (
    EARLIEST_NS,
    MAX_ATTRIBUTES,
    MAX_EVENTS,
    MAX_VALUE_CHARS,
    MAX_VALUE_DEPTH,
)
from tokentrace.schemas import attributes as A
from tokentrace.schemas.packed import encode_packed, token_span_id

pytestmark = pytest.mark.timeout(600)

T0_NS = 1_700_000_000_000_000_000
MS = 1_000_000


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with running_collector(tmp_path_factory.mktemp("otlp-properties")) as running:
        yield running


# -- what to draw ------------------------------------------------------------------------

_SCALARS = (
    st.text(max_size=30)
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.booleans()
    | st.binary(max_size=30)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_ATTRS = st.dictionaries(st.text(max_size=20), _VALUES, max_size=6)


def _lengths_but(right: int, shortest: int = 0) -> st.SearchStrategy[int]:
    """Id lengths from ``shortest`` to twice ``right`` bytes, except ``right``."""
    return st.sampled_from([n for n in range(shortest, 2 * right + 1) if n != right])


# A valid span's shapes, and the one flaw of an invalid one: kind -> its parameter.
_VALID: dict[str, st.SearchStrategy[Any]] = {
    "plain": st.none(),
    "events and links": st.integers(1, 4),
    "packed": st.integers(0, 30),
    "edge": st.sampled_from(
        [
            "1024 attributes",
            "longest value",
            "deepest array",
            "deepest kvlist",
            "starts in 2000",
            "ends 23 h ahead",
        ]
    ),
}
_AFTER_TOMORROW = st.integers(0, 2**64 - 1 - 2 * T0_NS)
_INVALID: dict[str, st.SearchStrategy[Any]] = {
    "zero trace id": st.none(),
    "trace id length": _lengths_but(16),
    "zero span id": st.none(),
    "span id length": _lengths_but(8),
    "parent id length": _lengths_but(8, shortest=1),
    "end before start": st.integers(1, 10**12),
    "starts before 2000": st.integers(1, EARLIEST_NS - 1),
    "ends after tomorrow": _AFTER_TOMORROW,
    "event before 2000": st.integers(0, EARLIEST_NS - 1),
    "event after tomorrow": _AFTER_TOMORROW,
    "too many attributes": st.integers(MAX_ATTRIBUTES + 1, 1_300),
    "too many events": st.integers(MAX_EVENTS + 1, 1_100),
    "value too long": st.integers(MAX_VALUE_CHARS + 1, 70_000),
    "too deep": st.tuples(st.sampled_from(["array", "kvlist"]), st.integers(17, 30)),
    "bad link": _lengths_but(16),
    "packed garbage": st.sampled_from(
        ["no prefix", "not base64", "wrong length", "times go back", "not a string"]
    ),
}


@dataclass
class SpanPlan:
    valid: bool
    kind: str
    param: Any
    name: str
    attrs: dict[str, Any]


@dataclass
class ResourcePlan:
    crowded: bool  # more than MAX_ATTRIBUTES resource attributes: all its spans rejected
    spans: list[SpanPlan] = field(default_factory=list)


@st.composite
def _span_plans(draw: st.DrawFn) -> SpanPlan:
    valid = draw(st.booleans())
    kinds = _VALID if valid else _INVALID
    kind = draw(st.sampled_from(sorted(kinds)))
    return SpanPlan(valid, kind, draw(kinds[kind]), draw(st.text(max_size=20)), draw(_ATTRS))


_EXPORTS = st.lists(
    st.builds(
        ResourcePlan,
        crowded=st.integers(0, 19).map(lambda n: n == 0),  # one resource in twenty
        spans=st.lists(_span_plans(), min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=3,
)


# -- building the export -----------------------------------------------------------------


@dataclass
class Expected:
    rejected: int = 0
    stored: set[tuple[str, str]] = field(default_factory=set)


def _packed_value(emissions: int, times_go_back: bool = False) -> str:
    times = [k * MS for k in range(emissions + 1)]
    if times_go_back:
        times[-1], times[-2] = times[-2], times[-1]
    # Both wire versions: version 2 (with prefill counts) for an even count, else 1.
    prefill = array("I", [emissions] * emissions) if emissions % 2 == 0 else None
    return encode_packed(
        array("q", times),
        array("q", range(emissions)),
        array("H", [1] * emissions),
        array("H", [4] * emissions),
        prefill,
    )


def _make_valid(s: Span, plan: SpanPlan, trace_hex: str, expected: Expected) -> None:
    kind, param = plan.kind, plan.param
    if kind == "events and links":
        for k in range(param):
            s.events.add(name=f"e{k}", time_unix_nano=s.start_time_unix_nano + k)
            s.links.add(trace_id=new_trace_id(), span_id=(k + 1).to_bytes(8, "big"))
    elif kind == "packed":
        s.name = A.SPAN_DECODE
        s.end_time_unix_nano = s.start_time_unix_nano + param * MS
        s.attributes.add(key=A.TOKEN_PACKED).value.string_value = _packed_value(param)
        for i in range(param):
            expected.stored.add((trace_hex, token_span_id(s.span_id, i).hex()))
    elif param == "1024 attributes":
        del s.attributes[:]
        for k in range(MAX_ATTRIBUTES):
            s.attributes.add(key=f"k{k}").value.int_value = k
    elif param == "longest value":
        s.attributes.add(key="long").value.string_value = "v" * MAX_VALUE_CHARS
    elif param in ("deepest array", "deepest kvlist"):
        nest(s.attributes.add(key="deep").value, MAX_VALUE_DEPTH, param.split()[1])
    elif param == "starts in 2000":
        s.start_time_unix_nano = EARLIEST_NS
    elif param == "ends 23 h ahead":
        s.end_time_unix_nano = time.time_ns() + 23 * HOUR_NS
    expected.stored.add((trace_hex, s.span_id.hex()))


def _break(s: Span, plan: SpanPlan) -> None:
    kind, param = plan.kind, plan.param
    start = s.start_time_unix_nano
    # The collector's clock a day from now is at most this; from here on is "after".
    tomorrow = time.time_ns() + 25 * HOUR_NS
    if kind == "zero trace id":
        s.trace_id = bytes(16)
    elif kind == "trace id length":
        s.trace_id = b"\x01" * param
    elif kind == "zero span id":
        s.span_id = bytes(8)
    elif kind == "span id length":
        s.span_id = b"\x02" * param
    elif kind == "parent id length":
        s.parent_span_id = b"\x03" * param
    elif kind == "end before start":
        s.end_time_unix_nano = start - param
    elif kind == "starts before 2000":
        s.start_time_unix_nano = param
    elif kind == "ends after tomorrow":
        s.end_time_unix_nano = tomorrow + param
    elif kind == "event before 2000":
        s.events.add(name="early", time_unix_nano=param)
    elif kind == "event after tomorrow":
        s.events.add(name="late", time_unix_nano=tomorrow + param)
    elif kind == "too many attributes":
        del s.attributes[:]
        for k in range(param):
            s.attributes.add(key=f"k{k}").value.int_value = k
    elif kind == "too many events":
        for _ in range(param):
            s.events.add(name="e", time_unix_nano=start)
    elif kind == "value too long":
        s.attributes.add(key="long").value.string_value = "v" * param
    elif kind == "too deep":
        nest(s.attributes.add(key="deep").value, param[1], param[0])
    elif kind == "bad link":
        s.links.add(trace_id=b"\x04" * param, span_id=b"\x05" * 8)
    elif kind == "packed garbage":
        s.name = A.SPAN_DECODE
        packed = s.attributes.add(key=A.TOKEN_PACKED).value
        if param == "no prefix":
            packed.string_value = _packed_value(3)[2:]
        elif param == "not base64":
            packed.string_value = "1:" + "!" * 20
        elif param == "wrong length":
            packed.string_value = _packed_value(3)[:-4]
        elif param == "times go back":
            packed.string_value = _packed_value(3, times_go_back=True)
        else:
            packed.int_value = 7
    else:
        raise AssertionError(f"no such flaw: {kind}")


def _build(
    plans: list[ResourcePlan], trace_ids: list[bytes]
) -> tuple[ExportTraceServiceRequest, Expected]:
    req = ExportTraceServiceRequest()
    expected = Expected()
    span_id = 0
    for r, resource in enumerate(plans):
        rs = ResourceSpans()
        rs.resource.attributes.add(key=A.SERVICE_NAME).value.string_value = f"svc-{r}"
        if resource.crowded:
            for k in range(MAX_ATTRIBUTES):
                rs.resource.attributes.add(key=f"r{k}").value.int_value = k
        scope = rs.scope_spans.add()
        for plan in resource.spans:
            event(f"{'valid' if plan.valid else 'invalid'} span: {plan.kind}")
            span_id += 1
            trace_id = trace_ids[span_id % len(trace_ids)]
            start = T0_NS + span_id * MS
            s = span(trace_id, span_id, start, start + MS, plan.name, plan.attrs)
            if span_id > 1:
                s.parent_span_id = (span_id - 1).to_bytes(8, "big")
            if resource.crowded:
                expected.rejected += 1  # whatever the span
                if not plan.valid:
                    _break(s, plan)
            elif plan.valid:
                _make_valid(s, plan, trace_id.hex(), expected)
            else:
                _break(s, plan)
                expected.rejected += 1
            scope.spans.append(s)
        req.resource_spans.append(rs)
    return req, expected


def _send(running: Running, transport: str, req: ExportTraceServiceRequest) -> Answer:
    if transport == "grpc":
        return export_grpc(running.info["otlp_grpc"], req.SerializeToString())
    url = f"http://{running.info['otlp_http']}/v1/traces"
    if transport == "http-json":
        return post(url, to_json(req), "application/json")
    return post(url, req.SerializeToString(), PROTOBUF)


# -- the property ------------------------------------------------------------------------


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    plans=_EXPORTS,
    transport=st.sampled_from(["http-protobuf", "http-protobuf", "http-json", "grpc"]),
)
def test_exactly_the_valid_spans_are_stored_and_every_invalid_one_reported(
    collector: Running, plans: list[ResourcePlan], transport: str
) -> None:
    # Fresh ids on every run: Hypothesis replays and shrinks examples, and each must
    # find only its own spans in the store.
    trace_ids = [new_trace_id(), new_trace_id()]
    req, expected = _build(plans, trace_ids)
    answer = _send(collector, transport, req)
    assert answer.status == 200, answer
    assert answer.grpc_code in (None, grpc.StatusCode.OK)
    assert answer.rejected_spans == expected.rejected, answer.message
    assert bool(answer.message) == (expected.rejected > 0), answer.message
    assert stored_span_ids(f"http://{collector.info['http']}", trace_ids) == expected.stored
