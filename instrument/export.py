"""The span exporter's bounded queue, and the counts of what it sent and dropped.

:class:`CountingBatchProcessor` takes the SDK ``BatchSpanProcessor``'s place behind
``setup_tracing``: a span's ``end()`` appends it to an in-memory queue and returns; one
daemon thread exports the queue in batches through the SDK's OTLP exporter, which
retries transient failures itself (in opentelemetry-exporter-otlp-proto-grpc 1.45:
gRPC ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``RESOURCE_EXHAUSTED``, ``ABORTED``,
``CANCELLED``, ``OUT_OF_RANGE``, ``DATA_LOSS``, with backoff 1, 2, 4, 8, 16 s ±20%,
all within its export timeout).

Why not the SDK's processor: it can say neither how many spans it dropped nor why.
Its queue-full check and the deque's own eviction are two separate steps, so even its
internal count (behind a private hook, off by default) is wrong whenever its worker
takes a batch between them. Here the decision to drop a span is the count: ``end()``
drops a span when the queue holds ``max_queue_size`` (never waiting for room, never
evicting an older span), and a batch the exporter finally fails is counted when the
exporter returns. Every span ended while tracing is on is therefore in exactly one of
``queued``, ``exporting``, ``exported``, ``dropped_queue_full``,
``dropped_export_failed`` and ``dropped_after_shutdown``.

The hot path takes no lock: an append to a ``collections.deque`` and integer
increments, which the GIL keeps whole. Drops are logged from the export thread, as
one WARNING per burst at most every ``warn_interval_s``, never from ``end()``.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from dataclasses import asdict, dataclass

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

__all__ = ["CountingBatchProcessor", "ExporterCounts"]

log = logging.getLogger(__name__)

_SETTLE_S = 5.0  # after the exporter's shutdown, its last export returns promptly


@dataclass(frozen=True)
class ExporterCounts:
    """What a process's span exporter has done since tracing started; all in spans but
    ``failed_exports`` (batches).

    ``queued`` and ``exporting`` are where spans are now; the others only grow. A
    snapshot taken while a batch moves from the queue to the exporter may be off by
    that batch; once the exporter is idle (after a flush or shutdown) every ended span
    is in exactly one field.
    """

    queue_capacity: int  # max_queue_size: the queue never holds more
    queued: int  # waiting in the queue
    exporting: int  # handed to the exporter, its export not yet returned
    exported: int  # acknowledged by the collector
    dropped_queue_full: int  # ended while the queue was full; never queued
    dropped_export_failed: int  # their export failed after the exporter's retries
    dropped_after_shutdown: int  # ended after tracing shut down
    failed_exports: int  # batches whose export failed

    @property
    def ended(self) -> int:
        """Spans ended (and sampled) since tracing started."""
        return (
            self.queued
            + self.exporting
            + self.exported
            + self.dropped_queue_full
            + self.dropped_export_failed
            + self.dropped_after_shutdown
        )

    @property
    def dropped(self) -> int:
        return self.dropped_queue_full + self.dropped_export_failed + self.dropped_after_shutdown

    def to_dict(self) -> dict[str, int]:
        """The fields as JSON-ready ints (what a worker's ``/health`` shows)."""
        return asdict(self)


class CountingBatchProcessor(SpanProcessor):
    """Queues ended spans (at most ``max_queue_size``) and exports them in batches of at
    most ``max_export_batch_size`` on one daemon thread, every ``schedule_delay_s`` or
    as soon as a batch is full.

    Threading: ``on_end`` may be called from any thread and never blocks or logs.
    ``force_flush`` exports on the caller's thread, serialised with the export thread.
    ``shutdown`` (idempotent) exports what is queued, waiting at most
    ``shutdown_timeout_s`` for that before it abandons the rest (left in ``queued``),
    then shuts the exporter down. ``endpoint`` only names the target in log lines,
    which go to ``logger`` (default: this module's).
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue_size: int = 65536,
        max_export_batch_size: int = 4096,
        schedule_delay_s: float = 0.5,
        shutdown_timeout_s: float = 30.0,
        warn_interval_s: float = 10.0,
        endpoint: str = "",
        logger: logging.Logger | None = None,
    ) -> None:
        for name, value in (
            ("max_queue_size", max_queue_size),
            ("max_export_batch_size", max_export_batch_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        if max_export_batch_size > max_queue_size:
            raise ValueError(
                f"max_export_batch_size ({max_export_batch_size}) must be <= max_queue_size "
                f"({max_queue_size})"
            )
        for name, seconds in (
            ("schedule_delay_s", schedule_delay_s),
            ("shutdown_timeout_s", shutdown_timeout_s),
            ("warn_interval_s", warn_interval_s),
        ):
            if not seconds > 0:
                raise ValueError(f"{name} must be positive, got {seconds!r}")
        self._exporter = exporter
        self._max_queue = max_queue_size
        self._max_batch = max_export_batch_size
        self._delay_s = schedule_delay_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self._warn_interval_s = warn_interval_s
        self._endpoint = endpoint
        self._log = logger or log
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()  # the export thread vs force_flush
        self._stopping = False  # no more spans are queued
        self._abandoned = False  # shutdown gave up waiting: take no further batch
        self._reset_counts()
        self._thread = self._start_thread()
        # A forked child (a server forking its workers) inherits neither the thread nor
        # the parent's spans: start over there, as the SDK's processor does.
        if hasattr(os, "register_at_fork"):
            ref = weakref.WeakMethod(self._after_fork)

            def after_in_child() -> None:
                method = ref()
                if method is not None:
                    method()

            os.register_at_fork(after_in_child=after_in_child)

    def _reset_counts(self) -> None:
        # Each counter has one writer at a time: on_end's threads (under the GIL) for
        # the drop counters, the export lock's holder for the rest.
        self._dropped_queue_full = 0
        self._dropped_after_shutdown = 0
        self._exporting = 0
        self._exported = 0
        self._dropped_export_failed = 0
        self._failed_exports = 0
        self._reported_drops = 0
        self._reported_at_s = time.monotonic() - self._warn_interval_s

    def _start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="tokentrace-export", daemon=True)
        thread.start()
        return thread

    def _after_fork(self) -> None:
        self._queue.clear()
        self._export_lock = threading.Lock()
        self._wake = threading.Event()
        self._reset_counts()
        if not self._stopping:
            self._thread = self._start_thread()

    # -- the hot path --

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        """Queue ``span`` for export, or count it as dropped; never blocks."""
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        if self._stopping:
            self._dropped_after_shutdown += 1
            return
        queue = self._queue
        if len(queue) >= self._max_queue:
            self._dropped_queue_full += 1
            return
        queue.append(span)
        if len(queue) >= self._max_batch and not self._wake.is_set():
            self._wake.set()

    # -- the export thread --

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self._export_queued()
            self._warn_about_drops()
        self._export_queued()

    def _export_queued(self, deadline_s: float | None = None) -> None:
        """Export everything queued, batch by batch; stop early at ``deadline_s``
        (monotonic; also the longest wait for the export thread's batch to finish) or
        once shutdown has abandoned the queue."""
        timeout_s = -1.0 if deadline_s is None else max(0.0, deadline_s - time.monotonic())
        if not self._export_lock.acquire(timeout=timeout_s):
            return
        try:
            queue = self._queue
            while queue and not self._abandoned:
                if deadline_s is not None and time.monotonic() >= deadline_s:
                    return
                # The only consumer (under the lock): the queue cannot shrink meanwhile.
                batch = [queue.popleft() for _ in range(min(self._max_batch, len(queue)))]
                self._exporting = len(batch)
                try:
                    ok = self._exporter.export(batch) == SpanExportResult.SUCCESS
                except Exception:  # an exporter must not take the thread down
                    self._log.warning("exporting %d spans raised", len(batch), exc_info=True)
                    ok = False
                if ok:
                    self._exported += len(batch)
                else:
                    self._dropped_export_failed += len(batch)
                    self._failed_exports += 1
                self._exporting = 0
        finally:
            self._export_lock.release()

    def _warn_about_drops(self, final: bool = False) -> None:
        """One WARNING for the spans dropped since the last one, at most every
        ``warn_interval_s`` (and at shutdown)."""
        now_s = time.monotonic()
        if not final and now_s - self._reported_at_s < self._warn_interval_s:
            return
        counts = self.counts()
        dropped = counts.dropped_queue_full + counts.dropped_export_failed
        new = dropped - self._reported_drops
        if new <= 0:
            return
        self._log.warning(
            "tokentrace exporter to %s dropped %d more spans; since start %d because the "
            "queue of %d was full, %d because their export failed after the exporter's "
            "retries (%d exported)",
            self._endpoint or "?",
            new,
            counts.dropped_queue_full,
            counts.queue_capacity,
            counts.dropped_export_failed,
            counts.exported,
        )
        self._reported_drops = dropped
        self._reported_at_s = now_s

    # -- control --

    def counts(self) -> ExporterCounts:
        """A snapshot of the counters; cheap, any thread."""
        return ExporterCounts(
            queue_capacity=self._max_queue,
            queued=len(self._queue),
            exporting=self._exporting,
            exported=self._exported,
            dropped_queue_full=self._dropped_queue_full,
            dropped_export_failed=self._dropped_export_failed,
            dropped_after_shutdown=self._dropped_after_shutdown,
            failed_exports=self._failed_exports,
        )

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Export everything queued now, on this thread; True when the queue emptied
        before ``timeout_millis`` (a batch already being exported runs to its end)."""
        if self._stopping:
            return False
        self._export_queued(deadline_s=time.monotonic() + timeout_millis / 1000)
        return not self._queue

    def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(self._shutdown_timeout_s)
        if self._thread.is_alive():
            self._abandoned = True  # take no further batch
        try:
            self._exporter.shutdown()  # cuts the batch in flight's retries short
            self._thread.join(_SETTLE_S)  # so the counts below include that batch
        finally:
            self._warn_about_drops(final=True)
            if self._queue:
                self._log.warning(
                    "tokentrace exporter to %s shut down with %d spans not sent",
                    self._endpoint or "?",
                    len(self._queue),
                )
