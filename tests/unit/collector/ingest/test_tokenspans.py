"""Canonical llm.token spans: the compiled scanner and the pure-Python twin give the same
rows, for real exports, for generated ones and for mutated bytes, and the scanner never
crashes or keeps memory on hostile input. (That those rows read back through the views
as the spans they came from is tests/unit/schemas/test_token_storage.py.)"""

from __future__ import annotations

import random
import shutil
import sysconfig
import time
import tracemalloc
from array import array
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from otlp_builders import T0_NS, key_values, packed_and_unpacked, span

from tokentrace.collector.ingest import tokenspans
from tokentrace.collector.ingest.decode import (
    EARLIEST_NS,
    MAX_ATTRIBUTES,
    MAX_FUTURE_NS,
    DecodeError,
    SpanBatch,
    decode_request,
    decode_wire,
    parse_protobuf,
)
from tokentrace.schemas import TOKEN_SPANS_COLUMNS
from tokentrace.schemas import attributes as A

# The clock decoding runs at: the SDK's spans are timed now, the hand-built ones at T0.
NOW_NS = time.time_ns()
LATEST_NS = NOW_NS + MAX_FUTURE_NS
RESOURCE = {A.SERVICE_NAME: "tokentrace-decode", A.NODE_ID: "decode-3", A.ROLE: "decode"}


def test_the_scanner_is_built() -> None:
    """make installs with a C compiler, which the test suite needs: the tests below run
    the compiled path against the pure-Python one (the loader refuses a scanner whose
    attribute keys are not the schema's: one built from an older source)."""
    compiler = str(sysconfig.get_config_var("CC") or "cc").split()[0]
    assert shutil.which(compiler), f"no C compiler ({compiler}): make test needs one"
    assert tokenspans.COMPILED, "the compiled scanner did not build or load"


# -- the batch as comparable values --------------------------------------------------


def _strings(data: bytes, rows: int) -> list[str]:
    out, at = [], 0
    for _ in range(rows):
        n = data[at]  # every id is shorter than 128 characters: a one-byte length
        out.append(data[at + 1 : at + 1 + n].decode())
        at += 1 + n
    assert at == len(data)
    return out


def token_rows(batch: SpanBatch) -> list[tuple[Any, ...]]:
    """The batch's token_spans rows as tuples, read back from the Native buffers."""
    tokens = batch.tokens
    columns = tokens.columns()
    rows = tokens.rows
    decoded: dict[str, list[Any]] = {}
    for name, column in columns.items():
        if hasattr(column, "data"):
            data = column.data  # type: ignore[union-attr]
            if column.wire_type == "String":  # type: ignore[union-attr]
                decoded[name] = _strings(data, rows)
            elif column.wire_type == "Nullable(Int64)":  # type: ignore[union-attr]
                nulls, values = data[:rows], array("q", data[rows:])
                decoded[name] = [None if z else v for z, v in zip(nulls, values, strict=True)]
            else:
                decoded[name] = list(array("q", data))
        else:
            decoded[name] = [str(v) for v, n in column.runs for _ in range(n)]  # type: ignore[union-attr]
    for name, values in decoded.items():
        assert len(values) == rows, name
    return list(zip(*decoded.values(), strict=True)) if rows else []


def comparable(batch: SpanBatch, *, ordered: bool = True) -> dict[str, Any]:
    tokens = token_rows(batch)
    return {
        "spans": batch.otel_spans_columns(),
        "packed": batch.packed,
        "tokens": tokens if ordered else sorted(map(repr, tokens)),
        "rejected": batch.rejected_spans,
        "errors": batch.errors,
    }


def both_ways(wire: bytes) -> tuple[SpanBatch, SpanBatch]:
    return (
        decode_wire(wire, now_ns=NOW_NS, compiled=True),
        decode_wire(wire, now_ns=NOW_NS, compiled=False),
    )


# -- requests ------------------------------------------------------------------------


def token_span(
    k: int, *, attrs: dict[str, Any] | None = None, prefill: bool = True, **changes: Any
) -> Span:
    values: dict[str, Any] = {
        A.EMISSION_INDEX: k,
        A.TOKEN_INDEX: 2 * k,
        A.TOKEN_COUNT: 2,
        A.ENGINE_STEP: 100 + k,
        A.BATCH_SIZE: 7,
    }
    if prefill:
        values[A.STEP_PREFILL_TOKENS] = 40 * k
    s = span(
        A.SPAN_TOKEN,
        0x1000 + k,
        T0_NS + k * 10**6,
        T0_NS + (k + 1) * 10**6,
        values if attrs is None else attrs,
        parent_id=0xDEC0DE,
    )
    for name, value in changes.items():
        if name == "status":
            s.status.CopyFrom(value)
        elif name == "event":
            s.events.add(name="e", time_unix_nano=T0_NS)
        elif name == "link":
            s.links.add(trace_id=bytes(range(1, 17)), span_id=bytes(range(1, 9)))
        else:
            setattr(s, name, value)
    return s


def export(*scopes: tuple[dict[str, Any], list[Span]]) -> bytes:
    """A request of one resource and scope per entry of ``scopes``."""
    req = ExportTraceServiceRequest()
    for k, (resource, spans) in enumerate(scopes):
        req.resource_spans.append(
            ResourceSpans(
                resource=Resource(attributes=key_values(resource)),
                scope_spans=[
                    ScopeSpans(
                        scope=InstrumentationScope(name=f"scope-{k}", version=str(k)), spans=spans
                    )
                ],
            )
        )
    return req.SerializeToString()


# Ways a span can miss the canonical shape by one thing; each still a valid span (but
# the last, which the general decoder rejects).
NEAR_MISSES: dict[str, Any] = {
    "name": lambda k: token_span(k, name="llm.tokens"),
    "kind": lambda k: token_span(k, kind=Span.SPAN_KIND_CLIENT),
    "trace_state": lambda k: token_span(k, trace_state="a=b"),
    "status": lambda k: token_span(k, status=Status(code=Status.STATUS_CODE_ERROR)),
    "status message": lambda k: token_span(k, status=Status(message="m")),
    "event": lambda k: token_span(k, event=True),
    "link": lambda k: token_span(k, link=True),
    "no parent": lambda k: token_span(k, parent_span_id=b""),
    "zero parent": lambda k: token_span(k, parent_span_id=bytes(8)),
    "order": lambda k: token_span(
        k,
        attrs={A.TOKEN_INDEX: 0, A.EMISSION_INDEX: k, A.TOKEN_COUNT: 1, A.ENGINE_STEP: 1}
        | {A.BATCH_SIZE: 1},
    ),
    "string value": lambda k: token_span(
        k,
        attrs={
            A.EMISSION_INDEX: str(k),
            A.TOKEN_INDEX: 0,
            A.TOKEN_COUNT: 1,
            A.ENGINE_STEP: 1,
            A.BATCH_SIZE: 1,
        },
    ),
    "extra attribute": lambda k: token_span(
        k,
        attrs={
            A.EMISSION_INDEX: k,
            A.TOKEN_INDEX: 0,
            A.TOKEN_COUNT: 1,
            A.ENGINE_STEP: 1,
            A.BATCH_SIZE: 1,
            A.STEP_PREFILL_TOKENS: 0,
            "x": 1,
        },
    ),
    "four attributes": lambda k: token_span(
        k, attrs={A.EMISSION_INDEX: k, A.TOKEN_INDEX: 0, A.TOKEN_COUNT: 1, A.ENGINE_STEP: 1}
    ),
    "end before start": lambda k: token_span(k, end_time_unix_nano=T0_NS - 1),
}


def extreme_token_span(k: int) -> Span:
    """Canonical, with values no emitter sends (negative, past the columns' ranges): the
    views must turn them into what the same span in otel_spans gives."""
    return token_span(
        k,
        attrs={
            A.EMISSION_INDEX: -1,
            A.TOKEN_INDEX: -(2**63),
            A.TOKEN_COUNT: 2**63 - 1,
            A.ENGINE_STEP: 2**40,
            A.BATCH_SIZE: 70_000,
            A.STEP_PREFILL_TOKENS: 2**32,
        },
    )


def test_a_real_export_of_token_spans_is_read_the_same_both_ways() -> None:
    """The SDK's own OTLP encoding of the recorder's token spans: every token span is a
    token_spans row, the decode span an ordinary span, and both readers agree."""
    unpacked, _packed = packed_and_unpacked()
    wire = unpacked.SerializeToString()
    fast, pure = both_ways(wire)
    assert comparable(fast) == comparable(pure)
    assert fast.tokens.rows == 5 and len(fast) == 1 and fast.name == [A.SPAN_DECODE]
    assert fast.accepted_spans == fast.expanded_spans == 6
    rows = token_rows(fast)
    first = TOKEN_SPANS_COLUMNS.index("EmissionIndex")
    # emission, token index, count, step, batch, prefill
    assert [r[first : first + 6] for r in rows] == [
        (0, 0, 1, 100, 7, 0),
        (1, 1, 1, 101, 6, 40),
        (2, 2, 3, 102, 5, 0),
        (3, 5, 1, 103, 4, 120),
        (4, 6, 2, 104, 3, 0),
    ]
    # decode_request, as before, keeps every span a span.
    plain = decode_request(parse_protobuf(wire), now_ns=NOW_NS)
    assert len(plain) == 6 and plain.tokens.rows == 0


@pytest.mark.parametrize("miss", list(NEAR_MISSES))
def test_a_span_one_thing_off_the_shape_is_an_ordinary_span(miss: str) -> None:
    wire = export((RESOURCE, [token_span(0), NEAR_MISSES[miss](1), token_span(2)]))
    fast, pure = both_ways(wire)
    assert comparable(fast) == comparable(pure)
    assert fast.tokens.rows == 2
    if miss == "end before start":
        assert fast.rejected_spans == 1 and "spans[1]" in fast.errors[0]
    else:
        assert len(fast) == 1 and fast.rejected_spans == 0


def test_rejections_name_the_span_where_it_was_sent() -> None:
    """Token spans taken out first do not shift the index a rejection names."""
    bad = token_span(9, end_time_unix_nano=T0_NS - 1)
    wire = export((RESOURCE, [token_span(0), token_span(1), bad, token_span(3)]))
    fast, pure = both_ways(wire)
    assert fast.errors == pure.errors
    assert "resource_spans[0].scope_spans[0].spans[2]" in fast.errors[0]


def test_an_invalid_resource_rejects_its_token_spans_too() -> None:
    crowded = {f"k{i}": i for i in range(MAX_ATTRIBUTES + 1)}
    wire = export((crowded, [token_span(0), token_span(1)]), (RESOURCE, [token_span(2)]))
    fast, pure = both_ways(wire)
    assert comparable(fast) == comparable(pure)
    assert fast.rejected_spans == 2 and fast.tokens.rows == 1


def test_token_spans_outside_the_time_window_are_rejected_by_name() -> None:
    early = token_span(0, start_time_unix_nano=EARLIEST_NS - 1)
    late = token_span(1, end_time_unix_nano=LATEST_NS + 1)
    fast, pure = both_ways(export((RESOURCE, [early, late, token_span(2)])))
    assert comparable(fast) == comparable(pure)
    assert fast.rejected_spans == 2 and fast.tokens.rows == 1


@settings(max_examples=150, deadline=None)
@given(
    scopes=st.lists(
        st.tuples(
            st.sampled_from([RESOURCE, {A.SERVICE_NAME: "p", A.NODE_ID: "p1"}, {}]),
            st.lists(
                st.one_of(
                    st.tuples(st.just("canonical"), st.booleans()),
                    st.tuples(st.just("extreme"), st.just(True)),
                    st.tuples(st.sampled_from(sorted(NEAR_MISSES)), st.just(True)),
                    st.tuples(st.just("other"), st.just(True)),
                ),
                max_size=12,
            ),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_generated_exports_are_read_the_same_both_ways(
    scopes: list[tuple[dict[str, Any], list[tuple[str, bool]]]],
) -> None:
    built = []
    for resource, kinds in scopes:
        spans = []
        for k, (kind, prefill) in enumerate(kinds):
            if kind == "canonical":
                spans.append(token_span(k, prefill=prefill))
            elif kind == "extreme":
                spans.append(extreme_token_span(k))
            elif kind == "other":
                spans.append(span(A.SPAN_DECODE, 0x2000 + k, T0_NS, T0_NS + 5, {"a": k}))
            else:
                spans.append(NEAR_MISSES[kind](k))
        built.append((resource, spans))
    fast, pure = both_ways(export(*built))
    assert comparable(fast) == comparable(pure)
    canonical = ("canonical", "extreme")
    assert fast.tokens.rows == sum(kind in canonical for _r, ks in scopes for kind, _p in ks)


# -- hostile bytes -------------------------------------------------------------------


def corpus() -> list[bytes]:
    """Real exports: the SDK's encoding of token spans, and hand-built mixes."""
    unpacked, packed = packed_and_unpacked()
    mixed = export(
        (RESOURCE, [token_span(k) for k in range(4)] + [NEAR_MISSES["event"](4)]),
        ({A.SERVICE_NAME: "p"}, [token_span(5, prefill=False), NEAR_MISSES["order"](6)]),
        ({}, [extreme_token_span(7)]),
    )
    return [unpacked.SerializeToString(), packed.SerializeToString(), mixed]


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        at = rng.randrange(len(b)) if b else 0
        if op == 0 and b:  # flip a bit
            b[at] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # a random byte
            b[at] = rng.randrange(256)
        elif op == 2:  # insert bytes
            b[at:at] = rng.randbytes(rng.randint(1, 3))
        elif op == 3 and b:  # delete bytes
            del b[at : at + rng.randint(1, 8)]
        elif op == 4:  # truncate
            del b[rng.randrange(len(b) + 1) :]
        else:  # repeat a slice (duplicate fields and spans)
            end = min(len(b), at + rng.randint(1, 64))
            b[at:at] = b[at:end]
    return bytes(b)


def outcome(wire: bytes, compiled: bool) -> Any:
    try:
        batch = decode_wire(wire, now_ns=NOW_NS, compiled=compiled)
    except DecodeError as exc:
        return ("refused", str(exc))
    return comparable(batch, ordered=False)


def test_mutated_exports_are_read_the_same_both_ways() -> None:
    """5,000 mutations of real exports (bit flips, bytes inserted, deleted, truncated,
    slices repeated): whatever the scanner takes, the request is refused with the same
    message or stored as the same rows as the pure-Python path stores them."""
    rng = random.Random(16)
    seeds = corpus()
    taken = 0
    for n in range(5000):
        wire = mutate(seeds[n % len(seeds)], rng)
        fast, pure = outcome(wire, True), outcome(wire, False)
        assert fast == pure, wire.hex()
        taken += isinstance(fast, dict) and bool(fast["tokens"])
    assert taken > 150  # many mutations left token spans to read


def test_the_scanner_keeps_no_memory_and_never_grows_past_its_input() -> None:
    rng = random.Random(7)
    seeds = corpus()
    inputs = [mutate(seeds[n % len(seeds)], rng) for n in range(2000)] + [
        b"",
        b"\x0a\xff\xff\xff\xff\x0f",  # a length far past the end
        b"\x0a\x80" * 10_000,  # a varint that never ends
        bytes(range(256)) * 64,
    ]
    scan = tokenspans.compiled_scan
    for wire in inputs:  # warm up
        scan(wire, EARLIEST_NS, LATEST_NS)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for wire in inputs:
            found = scan(wire, EARLIEST_NS, LATEST_NS)
            if found is not None:
                residual, rows, columns, _runs, _kept = found
                assert len(residual) <= len(wire)
                assert sum(map(len, columns)) == 132 * rows
            del found
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 64 * 1024
