"""OTLP forwarder: every accepted export → any OTLP endpoint (e.g. Jaeger v2).

One :class:`OtlpForwarder` per target. :meth:`OtlpForwarder.consume` only enqueues (it
never blocks and never raises), so forwarding adds no latency to an export's ack and a
slow or dead target never holds up storage. One sender thread per target drains a
bounded queue: transient failures (gRPC ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``,
``RESOURCE_EXHAUSTED``, ``ABORTED``; HTTP 429/502/503/504 and connection errors) are
retried with exponential backoff and jitter, honouring ``Retry-After``; permanent ones
(anything else, e.g. ``INVALID_ARGUMENT`` or HTTP 400) drop the batch and count it.
When the queue is full new batches are dropped and counted, with one log line per burst
of drops.

Targets: ``grpc://host:port`` (OTLP/gRPC, insecure; default port 4317) and
``http://host:port[/path]`` / ``https://...`` (OTLP/HTTP protobuf; default path
``/v1/traces``, default port 4318 for http).
"""

from __future__ import annotations

import collections
import email.utils
import logging
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from .retry import CollectorError, jittered_backoff_s

__all__ = [
    "ForwardConfig",
    "ForwardError",
    "OtlpForwarder",
    "retry_after_s",
]

_log = logging.getLogger(__name__)

_SCHEMES = ("grpc", "http", "https")
_DEFAULT_PORT = {"grpc": 4317, "http": 4318, "https": 4318}
_TRACES_PATH = "/v1/traces"
_PROTOBUF = "application/x-protobuf"
_RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
_RETRYABLE_GRPC_NAMES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")


@dataclass(frozen=True)
class ForwardConfig:
    """One forward target.

    ``queue_batches`` bounds the batches waiting for this target (beyond it new batches
    are dropped); a failed send is retried after ``initial_backoff_s`` doubling up to
    ``max_backoff_s`` (with jitter); each send may take up to ``timeout_s``.
    """

    url: str
    queue_batches: int = 1024
    max_backoff_s: float = 30.0
    timeout_s: float = 10.0
    initial_backoff_s: float = 0.5

    def validate(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in _SCHEMES:
            raise ValueError(
                f"forward URL {self.url!r} has scheme {parts.scheme or '(none)'!r}: "
                "use grpc://host:port, http://host:port or https://host:port"
            )
        if not parts.hostname:
            raise ValueError(f"forward URL {self.url!r} has no host")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"forward URL {self.url!r} has an invalid port") from None
        if port == 0:
            raise ValueError(f"forward URL {self.url!r} has port 0")
        if parts.scheme == "grpc" and parts.path not in ("", "/"):
            raise ValueError(f"forward URL {self.url!r}: a grpc:// target takes no path")
        if self.queue_batches < 1:
            raise ValueError(f"queue_batches must be >= 1, got {self.queue_batches!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if not self.max_backoff_s > 0:
            raise ValueError(f"max_backoff_s must be > 0, got {self.max_backoff_s!r}")
        if not self.initial_backoff_s > 0:
            raise ValueError(f"initial_backoff_s must be > 0, got {self.initial_backoff_s!r}")
        if not self.max_backoff_s >= self.initial_backoff_s:
            raise ValueError(
                f"max_backoff_s must be >= initial_backoff_s ({self.initial_backoff_s!r}), "
                f"got {self.max_backoff_s!r}"
            )

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    @property
    def grpc_target(self) -> str:
        """``host:port`` for a grpc:// URL (``[v6]:port`` for IPv6)."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        port = parts.port or _DEFAULT_PORT["grpc"]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def http_url(self) -> str:
        """The POST URL for an http(s):// target: ``/v1/traces`` unless a path is given."""
        parts = urlsplit(self.url)
        path = parts.path if parts.path not in ("", "/") else _TRACES_PATH
        netloc = parts.netloc
        if parts.port is None and parts.scheme == "http":
            netloc = f"{netloc}:{_DEFAULT_PORT['http']}"
        query = f"?{parts.query}" if parts.query else ""
        return f"{parts.scheme}://{netloc}{path}{query}"


def retry_after_s(value: str | None, now_s: float | None = None) -> float | None:
    """An HTTP ``Retry-After`` header (delta seconds or an HTTP date) in seconds from
    now, or None when absent or unparsable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now_s is None else now_s))


class ForwardError(CollectorError):
    """One send failed; ``transient`` says whether retrying may help."""


def span_count(request: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


# -- senders: one transport each, used only by the forwarder's thread -------------------


class _GrpcSender:
    def __init__(self, config: ForwardConfig) -> None:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        self._grpc = grpc
        max_backoff_ms = int(config.max_backoff_s * 1000)
        # grpc's own reconnect backoff (up to 120 s by default) would otherwise keep a
        # channel failing fast long after the target came back.
        initial_ms = min(int(config.initial_backoff_s * 1000), max_backoff_ms)
        self._channel = grpc.insecure_channel(
            config.grpc_target,
            options=[
                ("grpc.initial_reconnect_backoff_ms", initial_ms),
                ("grpc.min_reconnect_backoff_ms", initial_ms),
                ("grpc.max_reconnect_backoff_ms", max_backoff_ms),
                ("grpc.max_send_message_length", -1),
                ("grpc.enable_retries", 0),
            ],
        )
        self._stub = trace_service_pb2_grpc.TraceServiceStub(self._channel)
        self._retryable = frozenset(getattr(grpc.StatusCode, n) for n in _RETRYABLE_GRPC_NAMES)

    def send(self, request: ExportTraceServiceRequest, timeout_s: float) -> None:
        try:
            self._stub.Export(request, timeout=timeout_s)
        except self._grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            name = code.name if code is not None else "UNKNOWN"
            raise ForwardError(
                f"gRPC {name}: {details}", transient=code in self._retryable
            ) from exc

    def close(self) -> None:
        self._channel.close()


class _HttpSender:
    def __init__(self, config: ForwardConfig) -> None:
        import httpx

        self._httpx = httpx
        self._url = config.http_url
        self._client = httpx.Client(headers={"content-type": _PROTOBUF})

    def send(self, request: ExportTraceServiceRequest, timeout_s: float) -> None:
        body = request.SerializeToString()
        try:
            response = self._client.post(self._url, content=body, timeout=timeout_s)
        except self._httpx.TransportError as exc:
            raise ForwardError(f"HTTP {type(exc).__name__}: {exc}", transient=True) from exc
        if 200 <= response.status_code < 300:
            return
        text = response.text[:200].strip()
        raise ForwardError(
            f"HTTP {response.status_code}: {text}",
            transient=response.status_code in _RETRYABLE_HTTP,
            retry_after_s=retry_after_s(response.headers.get("retry-after")),
        )

    def close(self) -> None:
        self._client.close()


# -- the stage -------------------------------------------------------------------------


class OtlpForwarder:
    """Forwards export requests to one OTLP target.

    Thread-safe: :meth:`consume` may be called from any thread, never blocks and never
    raises. Requests handed to :meth:`consume` are owned by the forwarder afterwards
    (read only, on its sender thread). :meth:`start` and :meth:`shutdown` are idempotent;
    shutdown is safe without start.
    """

    def __init__(self, config: ForwardConfig) -> None:
        config.validate()
        self.config = config
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[ExportTraceServiceRequest, int]] = collections.deque()
        self._inflight = 0  # spans of the batch the sender holds (0: none)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stop_deadline = 0.0
        self._finished = False  # counters are final; the sender must not touch them
        self._sent_spans = 0
        self._dropped_spans = 0
        self._retries = 0
        self._in_drop_burst = False
        self._failing = False
        self._refusing = False

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the sender thread; idempotent (no-op after shutdown)."""
        with self._cond:
            if self._thread is not None or self._stopping:
                return
            self._thread = threading.Thread(
                target=self._run, name=f"tokentrace-forward {self.config.url}", daemon=True
            )
            self._thread.start()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, send what can be sent within ``timeout_s``, count the rest
        as dropped. Idempotent; blocks at most about ``timeout_s``."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._stop_deadline = time.monotonic() + max(0.0, timeout_s)
            thread = self._thread
            self._cond.notify_all()
        if thread is not None:
            # A send in flight at the deadline is cut short by its own timeout (capped by
            # the time left); a little slack lets it report before we give up on it.
            thread.join(timeout=max(0.0, timeout_s) + 1.0)
        with self._cond:
            self._finished = True
            batches = len(self._queue) + (1 if self._inflight else 0)
            spans = sum(n for _, n in self._queue) + self._inflight
            self._queue.clear()
            self._inflight = 0
            self._dropped_spans += spans
        if spans:
            _log.warning(
                "forwarding to %s: dropped %d spans in %d batches not sent within the "
                "%.1f s shutdown timeout",
                self.config.url,
                spans,
                batches,
                timeout_s,
            )

    # -- counters ------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """``sent_spans``, ``dropped_spans``, ``retries`` (failed attempts that were
        retried) and ``queue_batches`` (batches waiting or in flight)."""
        with self._cond:
            return {
                "sent_spans": self._sent_spans,
                "dropped_spans": self._dropped_spans,
                "retries": self._retries,
                "queue_batches": len(self._queue) + (1 if self._inflight else 0),
            }

    # -- the stage -----------------------------------------------------------------

    def consume(self, request: ExportTraceServiceRequest) -> None:
        """Enqueue ``request`` for sending; drop and count it if the queue is full or the
        forwarder is shut down. Never blocks on the target, never raises."""
        spans = span_count(request)
        if spans == 0:
            return
        with self._cond:
            if self._stopping:
                self._drop_locked(spans, "forwarder is shut down")
                return
            if len(self._queue) + (1 if self._inflight else 0) >= self.config.queue_batches:
                self._drop_locked(spans, f"queue of {self.config.queue_batches} batches is full")
                return
            self._in_drop_burst = False
            self._queue.append((request, spans))
            self._cond.notify()

    def _drop_locked(self, spans: int, why: str) -> None:
        self._dropped_spans += spans
        if not self._in_drop_burst:
            # One line per burst: a dead target would otherwise log every batch.
            self._in_drop_burst = True
            _log.warning(
                "forwarding to %s: dropping spans (%s); %d dropped so far, further drops "
                "until the queue drains are counted in /health without logging",
                self.config.url,
                why,
                self._dropped_spans,
            )

    # -- the sender thread ---------------------------------------------------------

    def _run(self) -> None:
        sender: _GrpcSender | _HttpSender
        try:
            sender = (
                _GrpcSender(self.config)
                if self.config.scheme == "grpc"
                else _HttpSender(self.config)
            )
        except Exception:  # never raise into the collector; the queue is dropped at shutdown
            _log.exception("forwarding to %s: cannot create a client", self.config.url)
            return
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stopping:
                        self._cond.wait()
                    if not self._queue or self._past_deadline_locked():
                        return
                    request, spans = self._queue.popleft()
                    self._inflight = spans
                self._deliver(sender, request, spans)
        finally:
            try:
                sender.close()
            except Exception:
                _log.debug("closing the forward client failed", exc_info=True)

    def _past_deadline_locked(self) -> bool:
        return self._stopping and time.monotonic() >= self._stop_deadline

    def _deliver(
        self, sender: _GrpcSender | _HttpSender, request: ExportTraceServiceRequest, spans: int
    ) -> None:
        """Send one batch until it is sent, permanently refused, or shutdown's deadline
        passes (then shutdown counts it as dropped)."""
        attempt = 0
        while True:
            with self._cond:
                timeout_s = self.config.timeout_s
                if self._stopping:
                    timeout_s = min(timeout_s, self._stop_deadline - time.monotonic())
                if timeout_s <= 0 or self._finished:
                    return  # left in flight: shutdown counts it
            try:
                sender.send(request, timeout_s)
            except ForwardError as exc:
                error: ForwardError | None = exc
            except Exception as exc:  # a client bug must not kill the sender thread
                error = ForwardError(f"{type(exc).__name__}: {exc}", transient=False)
            else:
                error = None
            with self._cond:
                if self._finished:
                    return
                if error is None:
                    self._sent_spans += spans
                    self._inflight = 0
                    self._refusing = False
                    if self._failing:
                        self._failing = False
                        _log.warning("forwarding to %s: target reachable again", self.config.url)
                    return
                if not error.transient:
                    self._inflight = 0
                    self._dropped_spans += spans
                    if not self._refusing:
                        # Logged once until a send succeeds: a target that refuses
                        # everything would otherwise log every batch.
                        self._refusing = True
                        _log.error(
                            "forwarding to %s: target refused %d spans permanently, "
                            "dropped (never retried): %s",
                            self.config.url,
                            spans,
                            error,
                        )
                    return
                self._retries += 1
                if not self._failing:
                    self._failing = True
                    _log.warning(
                        "forwarding to %s failed, retrying with backoff: %s",
                        self.config.url,
                        error,
                    )
                attempt += 1
                delay_s = jittered_backoff_s(
                    attempt, self.config.initial_backoff_s, self.config.max_backoff_s
                )
                if error.retry_after_s is not None:
                    delay_s = min(max(error.retry_after_s, 0.0), self.config.max_backoff_s)
                self._wait_locked(time.monotonic() + delay_s)

    def _wait_locked(self, until: float) -> None:
        """Sleep until ``until``, waking early only when shutdown's deadline comes first."""
        while True:
            now = time.monotonic()
            end = min(until, self._stop_deadline) if self._stopping else until
            if now >= end:
                return
            self._cond.wait(end - now)

    def __repr__(self) -> str:
        return f"OtlpForwarder({self.config.url!r})"
