"""ForwardConfig validation, target URLs, the backoff schedule and Retry-After; pure."""

from __future__ import annotations

import email.utils

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from tokentrace.collector.decode import accepted_request, decode_request
from tokentrace.collector.forward import (
    ForwardConfig,
    OtlpForwarder,
    retry_after_s,
)


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
        ({"queue_batches": 0}, "queue_batches"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"max_backoff_s": 0}, "max_backoff_s"),
        ({"initial_backoff_s": 2.0, "max_backoff_s": 1.0}, "max_backoff_s"),
    ],
)
def test_validate_rejects_bad_numbers(kwargs: dict[str, float], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        ForwardConfig("grpc://h:1", **kwargs).validate()


def test_forwarder_constructor_validates() -> None:
    with pytest.raises(ValueError, match="'udp'"):
        OtlpForwarder(ForwardConfig("udp://h:1"))


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


def test_forwarder_lifecycle_without_start_counts_drops() -> None:
    forwarder = OtlpForwarder(ForwardConfig("grpc://127.0.0.1:9", queue_batches=1))
    request = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[_span(1, "a")])])]
    )
    forwarder.consume(request)
    forwarder.consume(request)  # queue of one is full: dropped
    assert forwarder.counters() == {
        "sent_spans": 0,
        "dropped_spans": 1,
        "retries": 0,
        "queue_batches": 1,
    }
    forwarder.shutdown(0.0)  # never started: what is queued is dropped
    forwarder.shutdown(0.0)
    forwarder.start()  # no-op after shutdown
    forwarder.consume(request)
    assert forwarder.counters()["dropped_spans"] == 3
    assert forwarder.counters()["queue_batches"] == 0
