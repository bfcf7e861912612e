"""ForwardConfig validation, target URLs, Retry-After, what is sent for a logged export,
and the forwarder's cursor on a real write-ahead log (targets that do not answer)."""

from __future__ import annotations

import email.utils
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from tokentrace.collector.ingest.decode import accepted_request, decode_request
from tokentrace.collector.ingest.forward import (
    ForwardConfig,
    OtlpForwarder,
    forward_reader,
    forwarded_export,
    retry_after_s,
)
from tokentrace.collector.ingest.logrecord import encode_record, export_digest
from tokentrace.collector.ingest.wal import STORE_READER, LogReader, WalConfig, WriteAheadLog
from tokentrace.instrument.recorder import TokenRecorder
from tokentrace.schemas import attributes as A


@pytest.mark.parametrize(
    "url",
    ["grpc://127.0.0.1:4317", "grpc://jaeger", "http://jaeger:4318", "https://x/otlp/v1/traces"],
)
def test_validate_accepts_supported_schemes(url: str) -> None:
    ForwardConfig(url).validate()


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("ftp://host:21", "'ftp'"),
        ("grpcs://host:4317", "'grpcs'"),
        ("host:4317", "'host'"),
        ("127.0.0.1:4317", "scheme"),
        ("http://:4318", "no host"),
        ("grpc://host:99999", "invalid port"),
        ("grpc://host:4317/v1/traces", "takes no path"),
    ],
)
def test_validate_rejects_bad_urls_naming_them(url: str, named: str) -> None:
    with pytest.raises(ValueError) as info:
        ForwardConfig(url).validate()
    assert url in str(info.value) and named in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"timeout_s": 0}, "timeout_s"),
        ({"max_backoff_s": 0}, "max_backoff_s"),
        ({"initial_backoff_s": 2.0, "max_backoff_s": 1.0}, "max_backoff_s"),
    ],
)
def test_validate_rejects_bad_numbers(kwargs: dict[str, float], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ForwardConfig("grpc://h:1", **kwargs).validate()


def _log(path: Path, *urls: str) -> WriteAheadLog:
    readers = (LogReader(STORE_READER), *(forward_reader(u) for u in urls))
    return WriteAheadLog(WalConfig(str(path)), readers=readers)


def test_forwarder_constructor_validates(tmp_path: Path) -> None:
    log = _log(tmp_path, "grpc://h:1")
    try:
        with pytest.raises(ValueError, match="'udp'"):
            OtlpForwarder(ForwardConfig("udp://h:1"), log)
        with pytest.raises(KeyError, match="not a reader"):
            OtlpForwarder(ForwardConfig("grpc://h:2"), log)
    finally:
        log.close()


def test_each_target_has_its_own_readable_cursor_name() -> None:
    a, b = forward_reader("grpc://jaeger:4317"), forward_reader("grpc://jaeger_4317")
    assert a.name.startswith("forward-grpc_jaeger_4317-") and a.starts_at_end
    assert a.name != b.name
    a.validate()
    forward_reader("https://x.io/" + "p" * 500).validate()  # long URLs still make a name


def test_target_addresses() -> None:
    assert ForwardConfig("grpc://jaeger").grpc_target == "jaeger:4317"
    assert ForwardConfig("grpc://[::1]:5317").grpc_target == "[::1]:5317"
    assert ForwardConfig("http://jaeger").http_url == "http://jaeger:4318/v1/traces"
    assert ForwardConfig("http://jaeger:9/").http_url == "http://jaeger:9/v1/traces"
    assert ForwardConfig("https://x.io/otlp/t?k=1").http_url == "https://x.io/otlp/t?k=1"


def test_retry_after() -> None:
    assert retry_after_s(None) is None
    assert retry_after_s("") is None
    assert retry_after_s("7") == 7.0
    assert retry_after_s("soon") is None
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 12, usegmt=True)
    assert retry_after_s(date, now_s=now) == pytest.approx(12.0)
    assert retry_after_s(email.utils.formatdate(now - 5, usegmt=True), now_s=now) == 0.0


T0_NS = 1_700_000_000_000_000_000  # inside the accepted time window (2000 .. now + 24 h)


def _span(span_id: int, name: str, *, start: int = T0_NS + 10, end: int = T0_NS + 20) -> Span:
    return Span(
        trace_id=bytes.fromhex("0af7651916cd43dd8448eb211c80319c"),
        span_id=span_id.to_bytes(8, "big"),
        name=name,
        start_time_unix_nano=start,
        end_time_unix_nano=end,
    )


def test_accepted_request_strips_exactly_the_rejected_spans() -> None:
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                scope_spans=[
                    ScopeSpans(
                        spans=[_span(1, "good"), _span(2, "bad", start=T0_NS + 30, end=T0_NS + 20)]
                    ),
                    ScopeSpans(spans=[_span(0, "zero id")]),
                ]
            ),
            ResourceSpans(scope_spans=[ScopeSpans(spans=[_span(3, "also good")])]),
        ]
    )
    original = request.SerializeToString()
    accepted = accepted_request(request)
    assert request.SerializeToString() == original  # not modified
    names = [s.name for rs in accepted.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert names == ["good", "also good"]
    assert len(accepted.resource_spans[0].scope_spans) == 1
    assert decode_request(accepted).rejected_spans == 0
    assert len(decode_request(accepted)) == len(decode_request(request)) == 2


def test_a_logged_export_is_sent_as_is_and_a_packed_one_expanded() -> None:
    plain = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[_span(1, "a")])])]
    )
    wire = plain.SerializeToString()
    assert forwarded_export(wire) == (wire, 1)

    recorder = TokenRecorder(4)
    recorder.start()
    for step in range(3):
        recorder.record(1, step, 2)
    decode = _span(2, A.SPAN_DECODE)
    decode.attributes.add(key=A.TOKEN_PACKED).value.string_value = recorder.pack(
        decode.start_time_unix_nano
    )
    packed = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[decode])])]
    )
    body, spans = forwarded_export(packed.SerializeToString())
    sent = ExportTraceServiceRequest.FromString(body)
    names = [s.name for s in sent.resource_spans[0].scope_spans[0].spans]
    assert spans == 4 and names == [A.SPAN_DECODE] + [A.SPAN_TOKEN] * 3


def test_an_unreachable_target_holds_back_only_its_own_cursor(tmp_path: Path) -> None:
    url = "grpc://127.0.0.1:9"  # discard port: nothing answers
    log = _log(tmp_path, url)
    request = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[_span(1, "a")])])]
    )
    wire = request.SerializeToString()
    seq = log.append(encode_record(T0_NS, [(export_digest(wire), wire)]))
    log.commit(seq, STORE_READER)  # ClickHouse has it; the target has not
    forwarder = OtlpForwarder(ForwardConfig(url, initial_backoff_s=0.01, timeout_s=0.2), log)
    assert forwarder.counters() == {
        "sent_spans": 0,
        "dropped_spans": 0,
        "retries": 0,
        "pending_records": 1,
    }
    assert log.pending_bytes > 0  # kept for the target
    forwarder.shutdown(0.0)  # never started: nothing is sent, nothing is lost
    forwarder.shutdown(0.0)
    forwarder.start()  # no-op after shutdown
    assert forwarder.counters()["pending_records"] == 1
    log.close()
    log = _log(tmp_path, url)
    assert log.pending(forward_reader(url).name) == [seq]  # still there after a restart
    assert log.pending(STORE_READER) == []
    log.close()
