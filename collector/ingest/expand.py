"""A packed decode span expanded into its ``llm.token`` spans, as OTLP: what the
collector stored (ClickHouse expands the same payload by ``packed_tokens_spans_v3_mv``,
with the same span ids), sent on to forward targets."""

from __future__ import annotations

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tokentrace.schemas import attributes as attrs
from tokentrace.schemas.packed import PackedTokens, token_span_id

from .decode import packed_tokens_of

__all__ = ["expanded_request"]


def expanded_request(request: ExportTraceServiceRequest) -> ExportTraceServiceRequest:
    """A copy of ``request`` (already stripped of rejected spans) in which every packed
    ``llm.decode`` span is followed by its ``llm.token`` spans and no longer carries the
    packed attribute: what the collector stored, as OTLP, for forwarding."""
    out = ExportTraceServiceRequest()
    out.CopyFrom(request)
    for resource_spans in out.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            added: list[Span] = []
            for span in scope_spans.spans:
                _, tokens = packed_tokens_of(span)
                if tokens is None:
                    continue
                keep = [kv for kv in span.attributes if kv.key != attrs.TOKEN_PACKED]
                del span.attributes[:]
                span.attributes.extend(keep)
                added.extend(_token_spans(span, tokens))
            scope_spans.spans.extend(added)
    return out


def _token_spans(span: Span, tokens: PackedTokens) -> list[Span]:
    start = span.start_time_unix_nano
    out = []
    index = 0
    for i in range(len(tokens)):
        token = Span(
            trace_id=span.trace_id,
            span_id=token_span_id(span.span_id, i),
            parent_span_id=span.span_id,
            name=attrs.SPAN_TOKEN,
            kind=Span.SPAN_KIND_INTERNAL,
            start_time_unix_nano=start + tokens.times[i],
            end_time_unix_nano=start + tokens.times[i + 1],
        )
        for key, value in (
            (attrs.EMISSION_INDEX, i),
            (attrs.TOKEN_INDEX, index),
            (attrs.TOKEN_COUNT, tokens.counts[i]),
            (attrs.ENGINE_STEP, tokens.steps[i]),
            (attrs.BATCH_SIZE, tokens.batch_sizes[i]),
        ):
            token.attributes.add(key=key, value=AnyValue(int_value=value))
        if tokens.prefill_tokens is not None:
            token.attributes.add(
                key=attrs.STEP_PREFILL_TOKENS,
                value=AnyValue(int_value=tokens.prefill_tokens[i]),
            )
        out.append(token)
        index += tokens.counts[i]
    return out
