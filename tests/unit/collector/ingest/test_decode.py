"""decode: OTLP protobuf/JSON → SpanBatch, validation with partial success."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from otlp_builders import (
    T0_NS,
    TRACE_ID,
    fill_nested,
    key_values,
    packed_and_unpacked,
    request,
    span,
)

from tokentrace.collector.ingest.decode import (
    EARLIEST_NS,
    MAX_ATTRIBUTES,
    MAX_EVENTS,
    MAX_FUTURE_NS,
    MAX_LINKS,
    MAX_VALUE_CHARS,
    MAX_VALUE_DEPTH,
    DecodeError,
    SpanBatch,
    accepted_request,
    decode_request,
    parse_json,
    parse_protobuf,
)
from tokentrace.schemas import attributes as A

RESOURCE = {A.SERVICE_NAME: "decode-worker", A.NODE_ID: "d1", A.ROLE: "decode"}


def test_columns_follow_the_otel_traces_layout() -> None:
    req = request(
        RESOURCE,
        [
            span(
                A.SPAN_DECODE,
                1,
                T0_NS,
                T0_NS + 5_000,
                {"s": "x", "i": 7, "d": 0.25, "b": True, "arr": [1, "a", False]},
                kind=Span.SPAN_KIND_SERVER,
                parent_id=9,
                error=True,
            ),
        ],
    )
    batch = decode_request(parse_protobuf(req.SerializeToString()))
    cols = batch.otel_spans_columns()
    assert len(batch) == 1 and batch.rejected_spans == 0
    assert cols["Timestamp"] == [T0_NS]
    assert cols["Duration"] == [5_000]
    assert cols["TraceId"] == [TRACE_ID.hex()]
    assert cols["SpanId"] == ["0000000000000001"]
    assert cols["ParentSpanId"] == ["0000000000000009"]
    assert cols["SpanKind"] == ["Server"]
    assert cols["StatusCode"] == ["Error"]
    assert cols["ServiceName"] == ["decode-worker"]
    assert cols["ScopeName"] == ["tokentrace.test"] and cols["ScopeVersion"] == ["1.0"]
    assert cols["ResourceAttributes"][0][A.NODE_ID] == "d1"
    assert cols["SpanAttributes"] == [
        {"s": "x", "i": "7", "d": "0.25", "b": "true", "arr": '[1,"a",false]'}
    ]
    assert cols["Events.Name"] == [[]] and cols["Links.TraceId"] == [[]]


def test_root_span_has_empty_parent() -> None:
    batch = decode_request(request(RESOURCE, [span("x", 1, T0_NS, T0_NS)]))
    assert batch.parent_span_id == [""]


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (dict(trace_id=b"\x01" * 15), "trace_id must be 16 bytes, got 15"),
        (dict(trace_id=bytes(16)), "trace_id is all zeros"),
        (dict(span_id=b"\x01" * 9), "span_id must be 8 bytes, got 9"),
        (dict(span_id=bytes(8)), "span_id is all zeros"),
        (dict(parent_span_id=b"\x01" * 7), "parent_span_id must be 8 bytes, got 7"),
        (dict(end_time_unix_nano=T0_NS - 1), "end_time_unix_nano"),
        (
            dict(start_time_unix_nano=1, end_time_unix_nano=2),
            "start_time_unix_nano 1 (1970-01-01T00:00:00Z) is before 2000-01-01T00:00:00Z",
        ),
        (
            dict(end_time_unix_nano=2**64 - 1),
            "end_time_unix_nano 18446744073709551615 (2554-07-21T23:34:33Z) is more than 24 h "
            "after the collector's clock",
        ),
    ],
)
def test_invalid_spans_are_rejected_and_the_rest_kept(bad: dict, field: str) -> None:
    good = span("llm.token", 1, T0_NS, T0_NS + 10)
    broken = span("llm.broken", 2, T0_NS, T0_NS + 10)
    for key, value in bad.items():
        setattr(broken, key, value)
    batch = decode_request(request(RESOURCE, [good, broken]))
    assert batch.name == ["llm.token"]
    assert batch.rejected_spans == 1
    message = batch.error_message
    assert field in message
    assert "llm.broken" in message and "spans[1]" in message


def test_the_time_window_runs_from_2000_to_24_h_after_the_given_clock() -> None:
    """Bounds are inclusive, and the future one moves only with ``now_ns``, so decoding
    the same request at the same ``now_ns`` (a replay) gives the same answer."""
    now = T0_NS
    edge = now + MAX_FUTURE_NS
    spans = [
        span("at.earliest", 1, EARLIEST_NS, EARLIEST_NS + 10),
        span("before.earliest", 2, EARLIEST_NS - 1, EARLIEST_NS + 10),
        span("at.latest", 3, edge - 10, edge),
        span("after.latest", 4, edge - 10, edge + 1),
    ]
    batch = decode_request(request(RESOURCE, spans), now_ns=now)
    assert batch.name == ["at.earliest", "at.latest"]
    assert batch.rejected_spans == 2
    assert "is before 2000-01-01T00:00:00Z" in batch.errors[0]
    assert "before.earliest" in batch.errors[0]
    assert "after.latest" in batch.errors[1]
    assert "more than 24 h after the collector's clock (2023-11-14T22:13:20Z)" in batch.errors[1]
    # With the clock 1 ns later, the same span is in the window.
    later = decode_request(request(RESOURCE, spans), now_ns=now + 1)
    assert later.name == ["at.earliest", "at.latest", "after.latest"]


def test_an_event_outside_the_time_window_rejects_its_span() -> None:
    good = span("llm.token", 1, T0_NS, T0_NS + 10)
    good.events.add(name="ok", time_unix_nano=T0_NS + 5)
    unset = span("unset.event", 2, T0_NS, T0_NS + 10)
    unset.events.add(name="no time")
    future = span("future.event", 3, T0_NS, T0_NS + 10)
    future.events.add(name="ok", time_unix_nano=T0_NS)
    future.events.add(name="far", time_unix_nano=2**63)
    batch = decode_request(request(RESOURCE, [good, unset, future]), now_ns=T0_NS)
    assert batch.name == ["llm.token"] and batch.event_names == [["ok"]]
    assert batch.rejected_spans == 2
    assert "events[0].time_unix_nano 0 (1970-01-01T00:00:00Z) is before" in batch.errors[0]
    assert "events[1].time_unix_nano 9223372036854775808" in batch.errors[1]


def test_packed_token_times_outside_the_window_reject_the_decode_span() -> None:
    from array import array

    from tokentrace.schemas.packed import encode_packed

    def decode_span(span_id: int, times: list[int]) -> object:
        n = len(times) - 1
        value = encode_packed(
            array("q", times), array("q", range(n)), array("H", [1] * n), array("H", [1] * n)
        )
        return span(A.SPAN_DECODE, span_id, T0_NS, T0_NS + 10, {A.TOKEN_PACKED: value})

    spans = [
        decode_span(1, [0, 5, 10]),
        decode_span(2, [-T0_NS, 5]),  # the first token span would start in 1970
        decode_span(3, [0, MAX_FUTURE_NS + 1]),  # the last emission a day ahead
    ]
    batch = decode_request(request(RESOURCE, spans), now_ns=T0_NS)
    assert batch.span_id == ["0000000000000001"] and batch.packed_tokens == 2
    assert batch.rejected_spans == 2
    assert "tokentrace.token.packed: first token span start 0 " in batch.errors[0]
    assert "tokentrace.token.packed: last emission" in batch.errors[1]
    assert "more than 24 h after" in batch.errors[1]


def test_accepted_request_rejects_what_decode_rejects_at_the_same_clock() -> None:
    edge = T0_NS + MAX_FUTURE_NS
    req = request(RESOURCE, [span("in", 1, T0_NS, edge), span("out", 2, T0_NS, edge + 1)])
    kept = accepted_request(req, now_ns=T0_NS)
    assert [s.name for s in kept.resource_spans[0].scope_spans[0].spans] == ["in"]
    assert decode_request(kept, now_ns=T0_NS).rejected_spans == 0


def test_a_wrong_length_or_zero_link_id_rejects_its_span() -> None:
    good = span("llm.token", 1, T0_NS, T0_NS + 10)
    good.links.add(trace_id=TRACE_ID, span_id=b"\x05" * 8)
    short = span("short.link", 2, T0_NS, T0_NS + 10)
    short.links.add(trace_id=TRACE_ID[:15], span_id=b"\x05" * 8)
    zero = span("zero.link", 3, T0_NS, T0_NS + 10)
    zero.links.add(trace_id=TRACE_ID, span_id=b"\x05" * 8)
    zero.links.add(trace_id=TRACE_ID, span_id=bytes(8))
    batch = decode_request(request(RESOURCE, [good, short, zero]))
    assert batch.name == ["llm.token"] and batch.link_span_ids == [["0505050505050505"]]
    assert "links[0].trace_id must be 16 bytes, got 15" in batch.errors[0]
    assert "links[1].span_id is all zeros" in batch.errors[1]


def test_truncated_protobuf_is_a_decode_error() -> None:
    data = request(RESOURCE, [span("x", 1, T0_NS, T0_NS + 1, {"k": "v" * 50})]).SerializeToString()
    with pytest.raises(DecodeError, match="invalid OTLP protobuf"):
        parse_protobuf(data[: len(data) // 2])


def _json_doc(trace_id: str, span_id: str, **extra: object) -> dict:
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "s"},
                        "spans": [
                            {
                                "traceId": trace_id,
                                "spanId": span_id,
                                "parentSpanId": "",
                                "name": "llm.token",
                                "kind": "SPAN_KIND_INTERNAL",
                                "startTimeUnixNano": str(T0_NS),
                                "endTimeUnixNano": T0_NS + 7,
                                "attributes": [{"key": A.TOKEN_INDEX, "value": {"intValue": "4"}}],
                                "status": {"code": 2},
                                "links": [{"traceId": "11" * 16, "spanId": "22" * 8}],
                                "unknownField": 1,
                                **extra,
                            }
                        ],
                    }
                ],
            }
        ]
    }


@pytest.mark.parametrize("where", ["name", "key", "value"])
def test_a_string_that_is_not_utf8_refuses_the_request_by_name(where: str) -> None:
    """proto3 strings must be UTF-8 and the protobuf runtime refuses the whole request
    otherwise: it says so, and what to do instead."""
    marked = span("MARK" if where == "name" else "x", 1, T0_NS, T0_NS + 1)
    marked.attributes.extend(key_values({"MARK" if where == "key" else "k": "MARK"}))
    data = request(RESOURCE, [marked]).SerializeToString()
    if where == "value":
        data = data.replace(b"\x12\x06\x0a\x04MARK", b"\x12\x06\x0a\x04M\xff\xfeK")
    else:
        data = data.replace(b"MARK", b"M\xc3\x28K", 1)
    assert data.count(b"\xff\xfe") + data.count(b"\xc3\x28") == 1
    with pytest.raises(
        DecodeError, match="bad UTF-8.*not UTF-8.*send arbitrary bytes as bytes_value"
    ):
        parse_protobuf(data)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b'"M\xff\xfeK"', "invalid JSON: 'utf-8' codec can't decode byte 0xff"),
        (b'"M\\ud800K"', "Unpaired surrogate"),
    ],
)
def test_json_strings_that_are_not_utf8_refuse_the_request_by_name(text: bytes, match: str) -> None:
    body = json.dumps(_json_doc("11" * 16, "22" * 8, name="PLACEHOLDER")).encode()
    with pytest.raises(DecodeError, match=match):
        parse_json(body.replace(b'"PLACEHOLDER"', text))


def test_nesting_past_the_parsers_limit_refuses_the_whole_request_by_name() -> None:
    req = request(RESOURCE, [span("deep", 2, T0_NS, T0_NS + 10)])
    deep = req.resource_spans[0].scope_spans[0].spans[0]
    fill_nested(deep.attributes.add(key="d").value, 40, "kvlist")
    with pytest.raises(DecodeError, match="nested more than 100 levels deep"):
        parse_protobuf(req.SerializeToString())


@pytest.mark.parametrize("levels", [40, 100_000])
def test_deep_json_refuses_the_whole_request_not_a_recursion_error(levels: int) -> None:
    value = b'{"kvlistValue":{"values":[{"key":"k","value":' * levels
    value += b'{"stringValue":"leaf"}' + b"}]}}" * levels
    body = json.dumps(_json_doc("11" * 16, "22" * 8, attributes=[{"key": "d", "value": 0}]))
    body_bytes = body.encode().replace(b'"value": 0', b'"value": ' + value)
    with pytest.raises(DecodeError, match="too deep|nested too deeply"):
        parse_json(body_bytes)


def test_json_ids_are_hex_and_enums_may_be_names_or_ints() -> None:
    doc = _json_doc("5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174")
    batch = decode_request(parse_json(json.dumps(doc).encode()))
    assert batch.rejected_spans == 0
    assert batch.trace_id == ["5b8efff798038103d269b633813fc60c"]
    assert batch.span_id == ["eee19b7ec3c1b174"]
    assert batch.kind == ["Internal"] and batch.status_code == ["Error"]
    assert batch.start_ns == [T0_NS] and batch.end_ns == [T0_NS + 7]
    assert batch.attributes == [{A.TOKEN_INDEX: "4"}]
    assert batch.link_trace_ids == [["11" * 16]] and batch.link_span_ids == [["22" * 8]]


def test_json_wrong_length_id_is_rejected_with_partial_success() -> None:
    doc = _json_doc("5b8efff798038103d269b633813fc6", "eee19b7ec3c1b174")
    batch = decode_request(parse_json(json.dumps(doc)))
    assert len(batch) == 0 and batch.rejected_spans == 1
    assert "trace_id must be 16 bytes, got 15" in batch.error_message


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"{not json", "invalid JSON"),
        (b"[]", "top level"),
        (json.dumps(_json_doc("zz" * 16, "ee" * 8)).encode(), r"spans\[0\]\.traceId is not a hex"),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"startTimeUnixNano": "soon"}]}]}]}',
            "startTimeUnixNano",
        ),
    ],
)
def test_bad_json_is_a_decode_error_naming_the_problem(data: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        parse_json(data)


def test_a_packed_decode_span_becomes_one_token_emissions_row() -> None:
    _, packed_req = packed_and_unpacked()
    batch = decode_request(packed_req)
    assert (len(batch), batch.packed_spans, batch.packed_tokens) == (1, 1, 5)
    assert A.TOKEN_PACKED not in batch.attributes[0]  # stored without the attribute
    row = {name: values[0] for name, values in batch.packed.items()}
    assert (row["trace_id"], row["decode_span_id"]) == (batch.trace_id[0], batch.span_id[0])
    assert row["decode_start"] == batch.start_ns[0] and row["node"] == "decode-0"
    assert list(row["counts"]) == [1, 1, 3, 1, 2]
    assert list(row["steps"]) == [100, 101, 102, 103, 104]
    assert list(row["batch_sizes"]) == [7, 6, 5, 4, 3]
    assert len(row["times"]) == 6


def test_expanded_request_moves_the_packed_tokens_into_spans() -> None:
    from tokentrace.collector.ingest.expand import expanded_request
    from tokentrace.schemas.packed import token_span_id

    _, packed_req = packed_and_unpacked()
    expanded = expanded_request(packed_req)
    again = decode_request(expanded)
    assert again.packed_spans == 0 and len(again) == 6
    decode_id = again.span_id[again.name.index(A.SPAN_DECODE)]
    tokens = [i for i, n in enumerate(again.name) if n == A.SPAN_TOKEN]
    assert [again.span_id[i] for i in tokens] == [
        token_span_id(bytes.fromhex(decode_id), k).hex() for k in range(5)
    ]
    assert [again.attributes[i][A.TOKEN_INDEX] for i in tokens] == ["0", "1", "2", "5", "6"]
    # The input is left as it was.
    packed_attrs = packed_req.resource_spans[0].scope_spans[0].spans[0].attributes
    assert any(kv.key == A.TOKEN_PACKED for kv in packed_attrs)


def test_a_malformed_packed_span_is_rejected_by_name() -> None:
    bad = request({}, [span(A.SPAN_DECODE, 1, T0_NS, T0_NS + 10, {A.TOKEN_PACKED: "1:xx"})])
    batch = decode_request(bad)
    assert len(batch) == 0 and batch.rejected_spans == 1
    assert "tokentrace.token.packed" in batch.error_message
    assert "base64" in batch.error_message


# -- limits on attributes, events and links ----------------------------------------------


def _one_good_one_bad(bad: Span, *, resource: dict | None = None) -> SpanBatch:
    """Decode a request holding a good span then ``bad``; forwarding must drop the same."""
    good = span("llm.token", 1, T0_NS, T0_NS + 10, {"k": "v"})
    req = request(RESOURCE if resource is None else resource, [good, bad])
    batch = decode_request(req)
    kept = accepted_request(req)
    kept_names = [s.name for rs in kept.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert kept_names == batch.name
    return batch


def _many(count: int) -> dict[str, int]:
    return {f"a{k}": k for k in range(count)}


def test_attribute_counts_up_to_the_limit_are_kept() -> None:
    full = span("full", 2, T0_NS, T0_NS + 10, _many(MAX_ATTRIBUTES))
    full.events.add(name="e", time_unix_nano=T0_NS, attributes=key_values(_many(MAX_ATTRIBUTES)))
    batch = _one_good_one_bad(full, resource=_many(MAX_ATTRIBUTES))
    assert batch.name == ["llm.token", "full"] and batch.rejected_spans == 0
    assert len(batch.attributes[1]) == MAX_ATTRIBUTES
    assert len(batch.event_attributes[1][0]) == MAX_ATTRIBUTES


def test_ten_thousand_attributes_reject_the_span_naming_the_limit() -> None:
    batch = _one_good_one_bad(span("crowded", 2, T0_NS, T0_NS + 10, _many(10_000)))
    assert batch.name == ["llm.token"] and batch.rejected_spans == 1
    assert "'crowded'" in batch.error_message
    assert "attributes: 10000 attributes, more than the limit of 1024" in batch.error_message


@pytest.mark.parametrize("where", ["events", "links"])
def test_too_many_attributes_on_an_event_or_link_reject_the_span(where: str) -> None:
    bad = span("crowded", 2, T0_NS, T0_NS + 10)
    if where == "events":
        bad.events.add(name="ok", time_unix_nano=T0_NS)
        bad.events.add(name="e", time_unix_nano=T0_NS, attributes=key_values(_many(1025)))
    else:
        bad.links.add(trace_id=TRACE_ID, span_id=b"\x01" * 8)
        bad.links.add(trace_id=TRACE_ID, span_id=b"\x02" * 8, attributes=key_values(_many(1025)))
    batch = _one_good_one_bad(bad)
    assert batch.name == ["llm.token"]
    assert f"{where}[1].attributes: 1025 attributes, more than the limit" in batch.error_message


def test_too_many_events_or_links_reject_the_span() -> None:
    events = span("events", 2, T0_NS, T0_NS + 10)
    for _ in range(MAX_EVENTS + 1):
        events.events.add(name="e", time_unix_nano=T0_NS)
    links = span("links", 3, T0_NS, T0_NS + 10)
    for _ in range(MAX_LINKS + 1):
        links.links.add(trace_id=TRACE_ID, span_id=b"\x01" * 8)
    batch = decode_request(request(RESOURCE, [events, links]))
    assert len(batch) == 0 and batch.rejected_spans == 2
    assert "1025 events, more than the limit of 1024" in batch.errors[0]
    assert "1025 links, more than the limit of 1024" in batch.errors[1]


def test_a_crowded_resource_rejects_each_of_its_spans_and_no_other() -> None:
    crowded = request(_many(MAX_ATTRIBUTES + 1), [span("a", 1, T0_NS, T0_NS + 1)] * 3)
    fine = request(RESOURCE, [span("b", 2, T0_NS, T0_NS + 1)])
    crowded.resource_spans.extend(fine.resource_spans)
    batch = decode_request(crowded)
    assert batch.name == ["b"] and batch.rejected_spans == 3
    assert "resource.attributes: 1025 attributes" in batch.errors[0]
    kept = accepted_request(crowded)
    assert [rs.scope_spans[0].spans[0].name for rs in kept.resource_spans] == ["b"]


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("x" * (MAX_VALUE_CHARS + 1), "65537 characters"),
        (b"\x00" * (MAX_VALUE_CHARS // 4 * 3 + 1), "65540 characters (bytes_value)"),
        (["y" * 40_000, "z" * 40_000], "80007 characters (array_value)"),
        (list(range(MAX_VALUE_CHARS)), "longer than 65536 characters as JSON"),
    ],
)
def test_a_value_too_long_to_store_rejects_the_span(value: object, kind: str) -> None:
    batch = _one_good_one_bad(span("long", 2, T0_NS, T0_NS + 10, {"big": value}))
    assert batch.name == ["llm.token"] and batch.rejected_spans == 1
    assert "attributes['big']: " in batch.error_message and kind in batch.error_message


def test_values_up_to_the_length_limit_are_kept() -> None:
    at_limit = {"s": "x" * MAX_VALUE_CHARS, "b": b"\x00" * (MAX_VALUE_CHARS // 4 * 3)}
    batch = decode_request(request(RESOURCE, [span("long", 2, T0_NS, T0_NS + 10, at_limit)]))
    assert batch.rejected_spans == 0
    assert [len(v) for v in batch.attributes[0].values()] == [MAX_VALUE_CHARS] * 2


def test_the_packed_attribute_of_a_decode_span_is_exempt_from_the_length_limit() -> None:
    from array import array

    from tokentrace.schemas.packed import encode_packed

    n = 4000
    packed = encode_packed(
        array("q", range(n + 1)), array("q", range(n)), array("H", [1] * n), array("H", [1] * n)
    )
    assert len(packed) > MAX_VALUE_CHARS
    decode = span(A.SPAN_DECODE, 1, T0_NS, T0_NS + n, {A.TOKEN_PACKED: packed, "k": "v"})
    elsewhere = span("not.decode", 2, T0_NS, T0_NS + n, {A.TOKEN_PACKED: packed})
    batch = decode_request(request(RESOURCE, [decode, elsewhere]))
    assert batch.name == [A.SPAN_DECODE] and batch.packed_tokens == n
    assert batch.attributes == [{"k": "v"}]
    assert "tokentrace.token.packed']: value of" in batch.error_message


@pytest.mark.parametrize("kind", ["array", "kvlist"])
def test_values_nested_past_the_depth_limit_reject_the_span(kind: str) -> None:
    deepest = span("deepest", 2, T0_NS, T0_NS + 10)
    fill_nested(deepest.attributes.add(key="d").value, MAX_VALUE_DEPTH, kind)
    too_deep = span("too.deep", 3, T0_NS, T0_NS + 10)
    fill_nested(too_deep.attributes.add(key="d").value, MAX_VALUE_DEPTH + 1, kind)
    in_event = span("in.event", 4, T0_NS, T0_NS + 10)
    event = in_event.events.add(name="e", time_unix_nano=T0_NS)
    fill_nested(event.attributes.add(key="d").value, MAX_VALUE_DEPTH + 1, kind)
    # Both parse: the protobuf runtime's own nesting limit is deeper.
    req = parse_protobuf(request(RESOURCE, [deepest, too_deep, in_event]).SerializeToString())
    batch = decode_request(req)
    assert batch.name == ["deepest"] and batch.rejected_spans == 2
    assert "leaf" in batch.attributes[0]["d"]
    assert "attributes['d']: value nested more than 16 levels deep" in batch.errors[0]
    assert "events[0].attributes['d']: value nested more than 16" in batch.errors[1]


def test_nesting_no_parser_would_accept_is_still_a_span_rejection_not_a_recursion_error() -> None:
    """Requests built in memory (not parsed) have no nesting limit of their own."""
    req = request(
        RESOURCE, [span("good", 1, T0_NS, T0_NS + 10), span("deep", 2, T0_NS, T0_NS + 10)]
    )
    deep = req.resource_spans[0].scope_spans[0].spans[1]
    fill_nested(deep.attributes.add(key="d").value, 5_000)
    batch = decode_request(req)
    assert batch.name == ["good"] and batch.rejected_spans == 1
    assert "nested more than 16" in batch.error_message
    kept = accepted_request(req)
    assert [s.name for s in kept.resource_spans[0].scope_spans[0].spans] == ["good"]


def test_a_huge_span_name_or_id_is_cut_short_in_the_rejection_message() -> None:
    long_id = span("x", 1, T0_NS, T0_NS + 1)
    long_id.span_id = b"\x01" * 1_000_000
    batch = decode_request(request(RESOURCE, [span("n" * 1_000_000, 1, T0_NS, T0_NS - 1), long_id]))
    assert batch.rejected_spans == 2
    assert "... (1000000 characters)" in batch.errors[0]
    assert "... (1000000 bytes): span_id must be 8 bytes, got 1000000" in batch.errors[1]
    assert len(batch.error_message) < 1_000


# -- whatever arrives ----------------------------------------------------------------------

_VALID = request(
    RESOURCE,
    [
        span("a", 1, T0_NS, T0_NS + 10, {"s": "x", "i": 7, "arr": [1, "a", [True, 0.5]]}),
        span("b", 2, T0_NS, T0_NS + 20, {"m": {"k": [b"\x00", {"n": 1}]}}, parent_id=1),
    ],
).SerializeToString()


def _decodes_or_refuses(parse: Any, data: bytes) -> None:
    """``data`` is refused with a DecodeError, or decodes: every span stored or counted
    as rejected, and forwarding agrees with decode."""
    try:
        req = parse(data)
    except DecodeError:
        return
    batch = decode_request(req, now_ns=T0_NS)
    spans = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
    assert len(batch) + batch.rejected_spans == spans
    kept = accepted_request(req, now_ns=T0_NS)
    assert decode_request(kept, now_ns=T0_NS).span_id == batch.span_id


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2_000))
def test_any_bytes_parse_or_are_refused_with_a_decode_error(data: bytes) -> None:
    _decodes_or_refuses(parse_protobuf, data)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    st.integers(0, len(_VALID)),
)
def test_corrupted_requests_parse_or_are_refused_with_a_decode_error(
    flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(_VALID)
    for position, byte in flips:
        data[position] = byte
    _decodes_or_refuses(parse_protobuf, bytes(data[:cut]))


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)
_JSON_FIELDS = st.sampled_from(
    [
        "traceId",
        "spanId",
        "parentSpanId",
        "name",
        "kind",
        "startTimeUnixNano",
        "endTimeUnixNano",
        "attributes",
        "events",
        "links",
        "status",
        "droppedAttributesCount",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_JSON_FIELDS, _JSON_VALUES, max_size=4))
def test_any_json_in_a_span_parses_or_is_refused_with_a_decode_error(
    fields: dict[str, Any],
) -> None:
    doc = _json_doc("5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174")
    doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0].update(fields)
    _decodes_or_refuses(parse_json, json.dumps(doc).encode())
