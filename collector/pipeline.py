"""decode → derive → group-committed ClickHouse writes → forwarders; what receivers call.

An export is acknowledged only after its rows are committed: :meth:`Pipeline.consume`
decodes and derives on the caller's thread, hands the rows to one writer thread and
blocks until that thread has inserted them. The writer batches concurrent exports
(group commit) so many small exports cost few inserts. Once stored, the accepted part of
the export is handed to each forward stage's non-blocking ``consume`` (an enqueue), so
forwarding never delays the ack and never sees spans that were not stored.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from .decode import (
    SpanBatch,
    accepted_request,
    decode_request,
    expanded_request,
    parse_protobuf,
)
from .derive import DerivedRows, derive_rows
from .store import Store, StoreError

__all__ = ["ExportResult", "ForwardStage", "Pipeline", "PipelineConfig", "PipelineUnavailable"]

_log = logging.getLogger(__name__)


class PipelineUnavailable(Exception):
    """The export was not stored; the sender should retry later (transient)."""


@dataclass(frozen=True)
class PipelineConfig:
    """Group commit: flush when the oldest waiting export is ``flush_interval_ms`` old or
    ``max_batch_spans`` spans wait; a failed insert is retried ``insert_attempts`` times
    (transient errors only) ``retry_backoff_ms`` apart before exports are failed."""

    flush_interval_ms: float = 50.0
    max_batch_spans: int = 20_000
    insert_attempts: int = 3
    retry_backoff_ms: float = 200.0
    queue_exports: int = 1_000

    def validate(self) -> None:
        if self.flush_interval_ms < 0:
            raise ValueError(f"flush_interval_ms must be >= 0, got {self.flush_interval_ms!r}")
        if self.max_batch_spans < 1:
            raise ValueError(f"max_batch_spans must be >= 1, got {self.max_batch_spans!r}")
        if self.insert_attempts < 1:
            raise ValueError(f"insert_attempts must be >= 1, got {self.insert_attempts!r}")
        if self.retry_backoff_ms < 0:
            raise ValueError(f"retry_backoff_ms must be >= 0, got {self.retry_backoff_ms!r}")
        if self.queue_exports < 1:
            raise ValueError(f"queue_exports must be >= 1, got {self.queue_exports!r}")


@dataclass(frozen=True)
class ExportResult:
    """What happened to one export: spans stored, and spans rejected with why."""

    stored_spans: int
    rejected_spans: int
    error_message: str


@dataclass
class _Pending:
    batch: SpanBatch
    rows: DerivedRows
    future: Future[None] = field(default_factory=Future)


_STOP = object()
_ENQUEUE_TIMEOUT_S = 5.0


#: A next stage after storage: takes the stored request, must not block or raise.
ForwardStage = Callable[[ExportTraceServiceRequest], None]


class Pipeline:
    """Thread-safe. ``consume`` may be called from any number of threads; it blocks for
    up to one flush interval plus the insert time. The store is borrowed, not owned, and
    so are the ``forward`` stages (each an ``OtlpForwarder.consume``), which receive every
    stored export minus its rejected spans, on the exporter's thread, after the commit."""

    def __init__(
        self,
        store: Store,
        config: PipelineConfig | None = None,
        forward: Sequence[ForwardStage] = (),
    ) -> None:
        self.config = config or PipelineConfig()
        self.config.validate()
        self._store = store
        self._forward = tuple(forward)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.config.queue_exports)
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._accepting = False
        self._stopped = False
        self._counter_lock = threading.Lock()
        self._received = 0
        self._stored = 0
        self._rejected = 0
        self._packed = 0

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread; idempotent."""
        with self._state_lock:
            if self._thread is not None or self._stopped:
                return
            self._thread = threading.Thread(target=self._run, name="tokentrace-writer", daemon=True)
            self._accepting = True
            self._thread.start()

    def shutdown(self) -> None:
        """Stop accepting, store everything already accepted, stop the writer.

        Idempotent and safe without :meth:`start`. Blocks until the queue is drained.
        """
        with self._state_lock:
            if self._stopped:
                return
            self._stopped = True
            self._accepting = False
            thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join()

    # -- counters ------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """``spans_received`` (valid + rejected, packed token spans counted expanded),
        ``spans_stored``, ``spans_rejected``, ``packed_decode_spans`` (decode spans whose
        packed token emissions were expanded)."""
        with self._counter_lock:
            return {
                "spans_received": self._received,
                "spans_stored": self._stored,
                "spans_rejected": self._rejected,
                "packed_decode_spans": self._packed,
            }

    # -- the stage -----------------------------------------------------------------

    def consume(self, request: bytes | ExportTraceServiceRequest) -> ExportResult:
        """Decode, derive and store one export; return once its rows are committed.

        Raises :class:`~tokentrace.collector.decode.DecodeError` for an unparsable request
        (permanent) and :class:`PipelineUnavailable` when it could not be stored
        (transient: the sender should retry).
        """
        if isinstance(request, bytes | bytearray | memoryview):
            request = parse_protobuf(bytes(request))
        # One clock reading for both decode and the forwarded copy, so the spans
        # forwarded are exactly the spans stored.
        now_ns = time.time_ns()
        batch = decode_request(request, now_ns=now_ns)
        with self._counter_lock:
            self._received += len(batch) + batch.packed_tokens + batch.rejected_spans
            self._rejected += batch.rejected_spans
            self._packed += batch.packed_spans
        if len(batch) == 0:
            return ExportResult(0, batch.rejected_spans, batch.error_message)
        pending = _Pending(batch, derive_rows(batch))
        self._enqueue(pending)
        pending.future.result()
        if self._forward:
            accepted = (
                request if batch.rejected_spans == 0 else accepted_request(request, now_ns=now_ns)
            )
            if batch.packed_spans:
                accepted = expanded_request(accepted)  # forward what was stored
            for forward in self._forward:
                forward(accepted)
        return ExportResult(len(batch), batch.rejected_spans, batch.error_message)

    def _enqueue(self, pending: _Pending) -> None:
        # Checking and enqueueing under the state lock means nothing can slip in after
        # shutdown's stop marker, where no writer would ever resolve it.
        deadline = time.monotonic() + _ENQUEUE_TIMEOUT_S
        while True:
            with self._state_lock:
                if not self._accepting:
                    raise PipelineUnavailable("collector is not accepting spans (shutting down)")
                try:
                    self._queue.put_nowait(pending)
                    return
                except queue.Full:
                    pass
            if time.monotonic() > deadline:
                raise PipelineUnavailable("collector is overloaded: write queue is full")
            time.sleep(0.005)

    # -- the writer thread ----------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            group: list[_Pending] = [first]
            spans = len(first.batch) + first.batch.packed_tokens
            deadline = time.monotonic() + self.config.flush_interval_ms / 1000.0
            while spans < self.config.max_batch_spans:
                timeout = deadline - time.monotonic()
                try:
                    item = (
                        self._queue.get(timeout=timeout)
                        if timeout > 0
                        else (self._queue.get_nowait())
                    )
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                group.append(item)
                spans += len(item.batch) + item.batch.packed_tokens
            self._commit(group)
        # Drain whatever raced in before the stop marker.
        leftover: list[_Pending] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                leftover.append(item)
        if leftover:
            self._commit(leftover)

    def _commit(self, group: list[_Pending]) -> None:
        try:
            self._commit_group(group)
        except Exception as exc:  # a bug here must not leave exporters waiting forever
            _log.exception("group commit failed unexpectedly")
            for pending in group:
                if not pending.future.done():
                    pending.future.set_exception(PipelineUnavailable(f"internal error: {exc}"))

    def _commit_group(self, group: list[_Pending]) -> None:
        batch = SpanBatch()
        rows = DerivedRows()
        for pending in group:
            batch.extend(pending.batch)
            rows.extend(pending.rows)
        tables: list[tuple[str, dict[str, list[Any]]]] = [
            ("otel_traces", batch.otel_traces_columns()),
            *([("packed_tokens", batch.packed)] if batch.packed_spans else []),
            *rows.tables().items(),
        ]
        try:
            for table, columns in tables:
                self._insert_with_retry(table, columns)
        except StoreError as exc:
            _log.error("storing %d spans failed: %s", len(batch), exc)
            error = PipelineUnavailable(f"storing spans failed: {exc}")
            for pending in group:
                pending.future.set_exception(error)
            return
        with self._counter_lock:
            self._stored += len(batch) + batch.packed_tokens
        for pending in group:
            pending.future.set_result(None)

    def _insert_with_retry(self, table: str, columns: dict[str, list[Any]]) -> None:
        # Each table is retried on its own so a table that already committed is not
        # written twice; if retries run out the export fails and the sender's retry may
        # duplicate rows of earlier tables (at-least-once, never silently dropped).
        for attempt in range(1, self.config.insert_attempts + 1):
            try:
                self._store.insert(table, columns)
                return
            except StoreError as exc:
                if not exc.transient or attempt == self.config.insert_attempts:
                    raise
                _log.warning(
                    "insert into %s failed (attempt %d), retrying: %s", table, attempt, exc
                )
                time.sleep(self.config.retry_backoff_ms / 1000.0 * attempt)
