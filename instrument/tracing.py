"""Tracer set-up for a serving process: resource identity and the OTLP/gRPC exporter.

Without an endpoint (argument, ``TOKENTRACE_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_ENDPOINT``) tracing is a no-op: the tracer is OpenTelemetry's
no-op tracer and no span is built or exported, so instrumented code costs nothing
when off. (A worker's token recorder still runs: its times feed the ITL histogram at
``/metrics``.)
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tokentrace.instrument.clock import skew_ns
from tokentrace.instrument.export import CountingBatchProcessor, ExporterCounts
from tokentrace.runtime.auth import auth_headers
from tokentrace.schemas import attributes as A

log = logging.getLogger(__name__)

ENDPOINT_ENVS = ("TOKENTRACE_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
NODE_ID_ENV = "TOKENTRACE_NODE_ID"
TOKEN_SPANS_ENV = "TOKENTRACE_TOKEN_SPANS"
TOKEN_SPANS_MODES = ("packed", "spans")
TOKEN_SPANS_HELP = (
    "how token emissions are sent: packed (one attribute on llm.decode, expanded by "
    "tokentrace's collector; the default) or spans (one OTLP span each, for any "
    f"OTLP backend); default ${TOKEN_SPANS_ENV}, else packed"
)
INSTRUMENTATION_SCOPE = "tokentrace"


def resolve_endpoint(endpoint: str | None) -> str | None:
    """The OTLP endpoint to export to: the argument, else the environment, else None."""
    if endpoint:
        return endpoint
    for env in ENDPOINT_ENVS:
        value = os.environ.get(env)
        if value:
            return value
    return None


def resolve_token_spans(mode: str | None) -> str:
    """How token emissions are sent: the argument, else ``TOKENTRACE_TOKEN_SPANS``, else
    ``packed`` (one attribute on ``llm.decode`` that tokentrace's collector expands);
    ``spans`` sends one OTLP span per emission, for any other OTLP backend."""
    value = (mode or os.environ.get(TOKEN_SPANS_ENV) or "packed").strip().lower()
    if value not in TOKEN_SPANS_MODES:
        raise ValueError(
            f"token spans mode must be one of {', '.join(TOKEN_SPANS_MODES)}, got {value!r}"
            + ("" if mode else f" (from {TOKEN_SPANS_ENV})")
        )
    return value


def resolve_node_id(node_id: str | None) -> str:
    """The node identity: the argument, else ``TOKENTRACE_NODE_ID``, else the host name."""
    return node_id or os.environ.get(NODE_ID_ENV) or socket.gethostname()


class _Deferred:
    """One daemon thread that runs span-building work after the request path is done
    with it, so a response's last bytes never wait for spans to be built."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], None]) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="tokentrace-spans", daemon=True
                    )
                    self._thread.start()
        self._queue.put(fn)

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:  # never raise into the application; log and go on
                log.warning("building spans failed", exc_info=True)

    def drain(self, timeout_s: float = 10.0) -> None:
        """Run everything submitted so far, then stop the thread."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout_s)


def _shifted(span: ReadableSpan, by_ns: int) -> ReadableSpan:
    def shift(t: int | None) -> int | None:
        return None if t is None else t + by_ns

    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=span.attributes,
        events=[Event(e.name, e.attributes, shift(e.timestamp)) for e in span.events],
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=shift(span.start_time),
        end_time=shift(span.end_time),
        instrumentation_scope=span.instrumentation_scope,
    )


class SkewedExporter(SpanExporter):
    """Shifts every span and event time by ``skew_ns`` before handing the spans to
    ``exporter``: what ``TOKENTRACE_CLOCK_SKEW_MS`` does to a process's spans."""

    def __init__(self, exporter: SpanExporter, skew_ns: int) -> None:
        self.exporter = exporter
        self.skew_ns = skew_ns

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.exporter.export([_shifted(s, self.skew_ns) for s in spans])

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


@dataclass
class Tracing:
    """A process's tracing state. ``enabled`` is False when there is nowhere to export."""

    node_id: str
    role: str
    service_name: str
    endpoint: str | None
    tracer: trace.Tracer
    provider: TracerProvider | None = field(default=None, repr=False)
    token_spans: str = "packed"  # "packed" | "spans": see resolve_token_spans
    processor: CountingBatchProcessor | None = field(default=None, repr=False)
    _deferred: _Deferred = field(default_factory=_Deferred, repr=False)

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    @property
    def packed(self) -> bool:
        """Token emissions go out packed onto ``llm.decode`` (see :mod:`..recorder`)."""
        return self.token_spans == "packed"

    def exporter_counts(self) -> ExporterCounts | None:
        """What the exporter has queued, exported and dropped (spans); None when
        tracing is off. Still answers after :meth:`shutdown`, with the final counts."""
        return self.processor.counts() if self.processor is not None else None

    def defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (which builds and ends spans) on the span thread, in submission
        order; inline when tracing is off (then it only touches no-op spans)."""
        if self.provider is None:
            fn()
        else:
            self._deferred.submit(fn)

    def shutdown(self) -> None:
        """Build what was deferred, flush what is queued and stop exporting (waiting
        at most about 30 s for an unreachable collector). Idempotent; never raises."""
        self._deferred.drain()
        provider, self.provider = self.provider, None
        if provider is None:
            return
        try:
            provider.shutdown()
        except Exception:  # exporters never raise into the application
            log.warning("tracing shutdown failed", exc_info=True)


def setup_tracing(
    role: str,
    node_id: str | None = None,
    endpoint: str | None = None,
    service_name: str | None = None,
    export_delay_ms: int = 500,
    max_queue_size: int = 65536,
    token_spans: str | None = None,
    export_timeout_s: float | None = None,
    logger: logging.Logger | None = None,
) -> Tracing:
    """Create this process's tracer with tokentrace's resource attributes.

    ``endpoint`` is an OTLP/gRPC URL such as ``http://127.0.0.1:4317``; an ``https://``
    one uses TLS and verifies the collector against the CA file in
    ``OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE``, else ``OTEL_EXPORTER_OTLP_CERTIFICATE``,
    else the system's CAs (the SDK's exporter reads those variables itself).

    Export runs on its own thread (:class:`~.export.CountingBatchProcessor`): ending a
    span never blocks, a span ended while ``max_queue_size`` spans wait is dropped, and
    the SDK's OTLP exporter retries a failed batch within ``export_timeout_s`` (None:
    its own default, ``OTEL_EXPORTER_OTLP_TIMEOUT`` or 10 s) before the batch is
    dropped. :meth:`Tracing.exporter_counts` counts every span's fate; drops are
    logged as a WARNING at most every 10 s, to ``logger`` (default: the export
    module's). ``token_spans`` picks the token wire mode (:func:`resolve_token_spans`).
    """
    if role not in A.ROLES:
        raise ValueError(f"role must be one of {A.ROLES}, got {role!r}")
    if export_delay_ms <= 0:
        raise ValueError(f"export_delay_ms must be positive, got {export_delay_ms!r}")
    if max_queue_size < 1:
        raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size!r}")
    if export_timeout_s is not None and not export_timeout_s > 0:
        raise ValueError(f"export_timeout_s must be positive, got {export_timeout_s!r}")
    node = resolve_node_id(node_id)
    service = service_name or f"tokentrace-{role}"
    url = resolve_endpoint(endpoint)
    mode = resolve_token_spans(token_spans)
    if url is None:
        return Tracing(node, role, service, None, trace.NoOpTracer(), token_spans=mode)

    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    resource = Resource.create(
        {
            A.SERVICE_NAME: service,
            A.HOST_NAME: socket.gethostname(),
            A.NODE_ID: node,
            A.ROLE: role,
        }
    )
    provider = TracerProvider(resource=resource)
    insecure = not url.startswith("https://")
    # The collector's bearer token, when it requires one (TOKENTRACE_AUTH_TOKEN).
    exporter: SpanExporter = OTLPSpanExporter(
        endpoint=url, insecure=insecure, headers=auth_headers() or None, timeout=export_timeout_s
    )
    skew = skew_ns()
    if skew:
        log.warning("TOKENTRACE_CLOCK_SKEW_MS: span times shifted by %+.3f ms", skew / 1e6)
        exporter = SkewedExporter(exporter, skew)
    processor = CountingBatchProcessor(
        exporter,
        max_queue_size=max_queue_size,
        max_export_batch_size=min(4096, max_queue_size),
        schedule_delay_s=export_delay_ms / 1000,
        endpoint=url,
        logger=logger,
    )
    provider.add_span_processor(processor)
    tracer = provider.get_tracer(INSTRUMENTATION_SCOPE)
    return Tracing(
        node, role, service, url, tracer, provider, token_spans=mode, processor=processor
    )
