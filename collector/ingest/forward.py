"""OTLP forwarder: every accepted export → any OTLP endpoint (e.g. Jaeger v2).

One :class:`OtlpForwarder` per target, each a reader of the collector's write-ahead log
with its own persisted cursor (:mod:`.wal`): its thread sends the log's records in order,
at the target's pace, and moves the cursor past each one the target has taken. It never
waits for ClickHouse and ClickHouse never waits for it: while ClickHouse is unreachable
the target still gets every span, and while the target is down the log keeps what it has
not had (also across a restart), within the log's disk budget, which all sinks share.
Transient failures (gRPC ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``RESOURCE_EXHAUSTED``,
``ABORTED``; HTTP 429/502/503/504 and connection errors) are retried with exponential
backoff and jitter, honouring ``Retry-After``; permanent ones (anything else, e.g.
``INVALID_ARGUMENT`` or HTTP 400) drop that export and count it. Each export is sent as
it was accepted (rejected spans removed; a packed decode span followed by its
``llm.token`` spans, as stored): exactly once while the collector runs, at least once
across a crash (the export in flight when it died is sent again).

Targets: ``grpc://host:port`` (OTLP/gRPC, insecure; default port 4317) and
``http://host:port[/path]`` / ``https://...`` (OTLP/HTTP protobuf; default path
``/v1/traces``, default port 4318 for http).
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tokentrace.schemas import attributes as attrs

from ..retry import CollectorError, jittered_backoff_s
from .expand import expanded_request
from .logrecord import decode_record
from .otlp_parse import DecodeError, parse_protobuf
from .wal import LogReader, WalError, WriteAheadLog

__all__ = [
    "ForwardConfig",
    "ForwardError",
    "OtlpForwarder",
    "forward_reader",
    "forwarded_export",
    "retry_after_s",
]

_log = logging.getLogger(__name__)

_SCHEMES = ("grpc", "http", "https")
_DEFAULT_PORT = {"grpc": 4317, "http": 4318, "https": 4318}
_TRACES_PATH = "/v1/traces"
_PROTOBUF = "application/x-protobuf"
_RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
_RETRYABLE_GRPC_NAMES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")
_EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_PACKED_KEY = attrs.TOKEN_PACKED.encode()
# How often an idle sender thread looks whether it is being shut down.
_IDLE_POLL_S = 0.25


@dataclass(frozen=True)
class ForwardConfig:
    """One forward target.

    A failed send is retried after ``initial_backoff_s`` doubling up to
    ``max_backoff_s`` (with jitter); each send may take up to ``timeout_s``.
    """

    url: str
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


def forward_reader(url: str) -> LogReader:
    """The log reader (cursor) of the target ``url``: a name readable in the log's
    directory, unique per URL; a target new to the log starts at its end."""
    readable = re.sub(r"[^A-Za-z0-9.-]+", "_", url).strip("_.-")[:120]
    tag = hashlib.blake2b(url.encode(), digest_size=4).hexdigest()
    return LogReader(f"forward-{readable}-{tag}", starts_at_end=True)


def forwarded_export(wire: bytes) -> tuple[bytes, int]:
    """What the target gets for one logged export (its accepted spans, serialized), and
    how many spans that is: the same bytes, unless it holds packed decode spans, which
    are sent expanded into their ``llm.token`` spans, as they were stored."""
    request = parse_protobuf(wire)
    if _PACKED_KEY in wire:  # a cheap test first: most exports hold no packed span
        request = expanded_request(request)
        return request.SerializeToString(), span_count(request)
    return wire, span_count(request)


# -- senders: one transport each, used only by the forwarder's thread -------------------


class _GrpcSender:
    def __init__(self, config: ForwardConfig) -> None:
        import grpc

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
        # The logged bytes go out as they are (no serializer): they are the request.
        self._export = self._channel.unary_unary(
            _EXPORT_METHOD,
            request_serializer=None,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )
        self._retryable = frozenset(getattr(grpc.StatusCode, n) for n in _RETRYABLE_GRPC_NAMES)

    def send(self, body: bytes, timeout_s: float) -> None:
        try:
            self._export(body, timeout=timeout_s)
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

    def send(self, body: bytes, timeout_s: float) -> None:
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
    """Forwards the log's records to one OTLP target, from its own cursor.

    Thread-safe. The log is borrowed and must list :func:`forward_reader` of the URL
    among its readers. :meth:`start` and :meth:`shutdown` are idempotent; shutdown is
    safe without start.
    """

    def __init__(self, config: ForwardConfig, log: WriteAheadLog) -> None:
        config.validate()
        self.config = config
        self.reader = forward_reader(config.url).name
        log.position(self.reader)  # KeyError now, not on the thread, if not a reader
        self._log = log
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stop_deadline = 0.0
        self._finished = False  # counters are final; the sender must not touch them
        # (seq, exports of it sent): a record is committed once all its exports went.
        self._progress = (0, 0)
        self._sent_spans = 0
        self._dropped_spans = 0
        self._retries = 0
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
        """Send what the log holds for this target within ``timeout_s``, then stop; what
        is left stays in the log for the next start. Idempotent; blocks at most about
        ``timeout_s``."""
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
            thread.join(timeout=max(0.0, timeout_s) + _IDLE_POLL_S + 1.0)
        with self._cond:
            self._finished = True
        left = self._log.pending_count(self.reader)
        if left:
            _log.warning(
                "forwarding to %s: %d write-ahead log records not sent within the %.1f s "
                "shutdown timeout; they stay in the log and are sent after the next start",
                self.config.url,
                left,
                timeout_s,
            )

    # -- counters ------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """``sent_spans`` and ``dropped_spans`` (refused permanently by the target) since
        start, ``retries`` (failed attempts that were retried) and ``pending_records``
        (write-ahead log records this target has not had yet)."""
        with self._cond:
            out = {
                "sent_spans": self._sent_spans,
                "dropped_spans": self._dropped_spans,
                "retries": self._retries,
            }
        out["pending_records"] = self._log.pending_count(self.reader)
        return out

    # -- the sender thread ---------------------------------------------------------

    def _run(self) -> None:
        sender: _GrpcSender | _HttpSender
        try:
            sender = (
                _GrpcSender(self.config)
                if self.config.scheme == "grpc"
                else _HttpSender(self.config)
            )
        except Exception:  # never raise into the collector; the log keeps the records
            _log.exception("forwarding to %s: cannot create a client", self.config.url)
            return
        try:
            while not self._done():
                seqs = self._log.pending(self.reader)
                if not seqs:
                    self._log.wait_for_records(self.reader, _IDLE_POLL_S)
                    continue
                for seq in seqs:
                    if not self._forward_record(sender, seq):
                        return
        except WalError:  # the log was closed under a send that outlived shutdown
            return
        finally:
            try:
                sender.close()
            except Exception:
                _log.debug("closing the forward client failed", exc_info=True)

    def _done(self) -> bool:
        """Shutting down, and caught up with the log or out of time."""
        with self._cond:
            if not self._stopping:
                return False
            if time.monotonic() >= self._stop_deadline:
                return True
        return self._log.pending_count(self.reader) == 0

    def _forward_record(self, sender: _GrpcSender | _HttpSender, seq: int) -> bool:
        """Send every export of record ``seq`` not sent yet and move the cursor past it;
        False when shutdown's deadline came first."""
        _written_ns, exports = decode_record(self._log.read(seq))
        done_seq, done = self._progress
        for k in range(done if done_seq == seq else 0, len(exports)):
            try:
                body, spans = forwarded_export(exports[k][1])
            except DecodeError as exc:  # cannot happen for what the collector logged
                _log.error(
                    "forwarding to %s: log record %d unreadable: %s", self.config.url, seq, exc
                )
                body, spans = b"", 0
            if spans and not self._deliver(sender, body, spans):
                return False
            self._progress = (seq, k + 1)
        self._log.commit(seq, self.reader)
        return True

    def _deliver(self, sender: _GrpcSender | _HttpSender, body: bytes, spans: int) -> bool:
        """Send one export until it is sent or permanently refused (True), or shutdown's
        deadline passes (False: it stays in the log)."""
        attempt = 0
        while True:
            with self._cond:
                timeout_s = self.config.timeout_s
                if self._stopping:
                    timeout_s = min(timeout_s, self._stop_deadline - time.monotonic())
                if timeout_s <= 0 or self._finished:
                    return False
            try:
                sender.send(body, timeout_s)
            except ForwardError as exc:
                error: ForwardError | None = exc
            except Exception as exc:  # a client bug must not kill the sender thread
                error = ForwardError(f"{type(exc).__name__}: {exc}", transient=False)
            else:
                error = None
            with self._cond:
                if self._finished:
                    return False
                if error is None:
                    self._sent_spans += spans
                    self._refusing = False
                    if self._failing:
                        self._failing = False
                        _log.warning("forwarding to %s: target reachable again", self.config.url)
                    return True
                if not error.transient:
                    self._dropped_spans += spans
                    if not self._refusing:
                        # Logged once until a send succeeds: a target that refuses
                        # everything would otherwise log every export.
                        self._refusing = True
                        _log.error(
                            "forwarding to %s: target refused %d spans permanently, "
                            "dropped (never retried): %s",
                            self.config.url,
                            spans,
                            error,
                        )
                    return True
                self._retries += 1
                if not self._failing:
                    self._failing = True
                    _log.warning(
                        "forwarding to %s failed, retrying with backoff (the write-ahead "
                        "log keeps what it has not had): %s",
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
