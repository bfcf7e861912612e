"""The span conventions, built in one place: every ``llm.*`` span any tokentrace emitter
makes (the router, the reference workers, the vLLM plugin) starts and ends here, so its
name, kind, parent and attributes are the ones DESIGN.md and the collector's
derivation expect, whoever emits it.

=================  ======== ====================================================
span               kind     made by
=================  ======== ====================================================
``llm.request``    SERVER   the router, from arrival to the last content written
``llm.prefill``    SERVER   a prefill worker (or a worker prefilling in a step)
``llm.kv_transfer`` CLIENT  the side that reads the KV (decode, pull mode)
``llm.decode``     SERVER   a decode worker, from arrival to the last emission
``llm.token``      INTERNAL the decode worker's emissions (:mod:`.recorder`)
=================  ======== ====================================================

Times are wall-clock nanoseconds (the node's ``time.time_ns`` clock; the collector
aligns nodes). Functions that end a span take its end time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from tokentrace.schemas import attributes as A

__all__ = [
    "end_decode",
    "end_request",
    "ended_prefill",
    "kv_transfer",
    "request_attributes",
    "set_stage_times",
    "start_decode",
    "start_prefill",
    "start_request",
]


def request_attributes(
    request_id: str,
    input_tokens: int,
    *,
    max_tokens: int | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """What ``llm.prefill`` and ``llm.decode`` carry about the request from the start."""
    out: dict[str, Any] = {A.REQUEST_ID: request_id, A.GEN_AI_USAGE_INPUT_TOKENS: input_tokens}
    if max_tokens is not None:
        out[A.GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
    if model is not None:
        out[A.GEN_AI_REQUEST_MODEL] = model
    return out


def start_request(
    tracer: trace.Tracer, parent: Context, start_ns: int, request_id: str, *, chat: bool
) -> trace.Span:
    """The router's ``llm.request``, started at the request's arrival."""
    return tracer.start_span(
        A.SPAN_REQUEST,
        context=parent,
        kind=SpanKind.SERVER,
        start_time=start_ns,
        attributes={
            A.GEN_AI_OPERATION_NAME: "chat" if chat else "text_completion",
            A.REQUEST_ID: request_id,
        },
    )


def end_request(
    span: trace.Span,
    *,
    status: int,
    input_tokens: int | None,
    output_tokens: int | None,
    ttft_s: float | None,
    e2e_s: float | None,
    finish_reasons: Sequence[str],
    error: str | None,
) -> None:
    """End ``llm.request`` with what the client got: TTFT and E2E as a benchmark client
    times them (to the first and the last content written), usage, status."""
    if input_tokens is not None:
        span.set_attribute(A.GEN_AI_USAGE_INPUT_TOKENS, input_tokens)
    if output_tokens is not None:
        span.set_attribute(A.GEN_AI_USAGE_OUTPUT_TOKENS, output_tokens)
    if ttft_s is not None:
        span.set_attribute(A.GEN_AI_SERVER_TTFT, ttft_s)
    if e2e_s is not None:
        span.set_attribute(A.E2E_S, e2e_s)
    if finish_reasons:
        span.set_attribute(A.GEN_AI_RESPONSE_FINISH_REASONS, list(finish_reasons))
    span.set_attribute(A.HTTP_STATUS, status)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def start_prefill(
    tracer: trace.Tracer, parent: Context, start_ns: int, attributes: dict[str, Any]
) -> trace.Span:
    """``llm.prefill`` from the request's arrival (``attributes``: :func:`request_attributes`)."""
    return _start_worker_span(tracer, A.SPAN_PREFILL, parent, start_ns, attributes)


def set_stage_times(span: trace.Span, queue_s: float, compute_s: float) -> None:
    """Arrival → the engine starts the request, and the engine's compute for it."""
    span.set_attribute(A.QUEUE_TIME_S, queue_s)
    span.set_attribute(A.COMPUTE_TIME_S, compute_s)


def ended_prefill(
    tracer: trace.Tracer,
    parent: Context,
    attributes: dict[str, Any],
    start_ns: int,
    started_ns: int,
    end_ns: int,
) -> None:
    """A whole ``llm.prefill`` after the fact: arrival ``start_ns``, the engine started at
    ``started_ns``, KV ready at ``end_ns``."""
    span = start_prefill(tracer, parent, start_ns, attributes)
    set_stage_times(span, (started_ns - start_ns) / 1e9, (end_ns - started_ns) / 1e9)
    span.end(end_time=end_ns)


def start_decode(
    tracer: trace.Tracer, parent: Context, start_ns: int, attributes: dict[str, Any]
) -> trace.Span:
    """``llm.decode`` from the request's arrival (``attributes``: :func:`request_attributes`)."""
    return _start_worker_span(tracer, A.SPAN_DECODE, parent, start_ns, attributes)


def _start_worker_span(
    tracer: trace.Tracer, name: str, parent: Context, start_ns: int, attributes: dict[str, Any]
) -> trace.Span:
    """A worker's SERVER span of one request, from its arrival."""
    return tracer.start_span(
        name, context=parent, kind=SpanKind.SERVER, start_time=start_ns, attributes=attributes
    )


def end_decode(
    span: trace.Span,
    *,
    output_tokens: int,
    finish_reason: str,
    ttft_s: float | None,
    error: str | None,
    end_ns: int | None,
) -> None:
    """End ``llm.decode`` (its ``llm.token`` spans or packed emissions already made):
    tokens generated, why it stopped, the engine-side TTFT on this node."""
    span.set_attribute(A.GEN_AI_USAGE_OUTPUT_TOKENS, output_tokens)
    span.set_attribute(A.GEN_AI_RESPONSE_FINISH_REASONS, [finish_reason])
    if ttft_s is not None:
        span.set_attribute(A.GEN_AI_SERVER_TTFT, ttft_s)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=end_ns)


def kv_transfer(
    tracer: trace.Tracer,
    parent: Context,
    start_ns: int,
    end_ns: int,
    *,
    bytes_moved: int,
    blocks: int,
    backend: str,
    src_node: str | None = None,
    dst_node: str | None = None,
    descriptors: int | None = None,
    links: Sequence[Link] = (),
    error: BaseException | str | None = None,
) -> None:
    """One whole ``llm.kv_transfer``: the read of a request's KV, on the reading side."""
    attributes: dict[str, Any] = {
        A.KV_BYTES: bytes_moved,
        A.KV_BLOCKS: blocks,
        A.KV_BACKEND: backend,
    }
    for key, value in (
        (A.KV_SRC_NODE, src_node),
        (A.KV_DST_NODE, dst_node),
        (A.KV_DESCRIPTORS, descriptors),
    ):
        if value is not None:
            attributes[key] = value
    span = tracer.start_span(
        A.SPAN_KV_TRANSFER,
        context=parent,
        kind=SpanKind.CLIENT,
        start_time=start_ns,
        attributes=attributes,
        links=list(links),
    )
    if isinstance(error, BaseException):
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, str(error)))
    elif error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=end_ns)
