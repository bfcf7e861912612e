"""decode → derive → write-ahead log (acknowledged) → block inserts into ClickHouse.

:meth:`Pipeline.consume` decodes and derives an export on the caller's thread and hands
it to the log writer thread, which appends the exports that arrived together (a group
commit) as one record of the write-ahead log, fsyncs it and acknowledges them: an
export is acknowledged once it is durable in the log, not once it is in ClickHouse.
The inserter thread then writes the records' rows into ClickHouse in log order, many
records at a time: a block closes when its oldest record has waited
:attr:`PipelineConfig.insert_interval_ms` or its records hold
:attr:`PipelineConfig.max_block_bytes`, because every INSERT costs ClickHouse a fixed
10-30 ms of CPU (new parts on disk) whatever its size. Each insert carries a
deduplication token made of the log's id, the block's first and last sequence numbers
and the table; the block is named in the log before it is inserted (:meth:`.wal.
WriteAheadLog.begin_block`), so a block inserted again after a crash is dropped by
ClickHouse instead of stored twice. A sender that re-sends an export it got no answer
for (the collector crashed after logging it) is answered from a digest of the exports
accepted last, also kept in the log, so that export is not stored twice either.

So what an exporter was told is stored is durable at once and queryable within about
``insert_interval_ms`` (``store_lag_s`` in the counters says how far behind the store
is). While ClickHouse fails, records wait in the log and inserts are retried. Past the
disk budget (:attr:`WalConfig.max_bytes` of records that some exporter has not delivered
yet) ``consume`` raises :class:`PipelineFull` and accepts nothing more until the backlog
shrinks. Memory is bounded by configuration: at most ``queue_exports`` decoded exports
wait for the log writer, and the rows of at most ``held_blocks`` blocks' worth of
records (``held_blocks * max_block_bytes`` of log records) are kept decoded; records
beyond that (a backlog: ClickHouse slower than the exporters, or down) are read
back from the log when their block comes.

The ClickHouse writer here is one reader of the log (:data:`.wal.STORE_READER`); the
OTLP forwarders are others, each with its own cursor (:mod:`.forward`), so an outage of
one sink holds back only its own cursor, never the other sinks.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import Histogram

from ..native import Column
from ..retry import jittered_backoff_s
from ..store import Store, StoreError
from .decode import SpanBatch, accepted_request, decode_wire
from .derive import DerivedRows, derive_rows
from .logrecord import decode_record, encode_record, export_digest
from .otlp_parse import parse_protobuf
from .wal import STORE_READER, WalError, WriteAheadLog

__all__ = [
    "Consumer",
    "ExportResult",
    "Pipeline",
    "PipelineConfig",
    "PipelineFull",
    "PipelineUnavailable",
    "store_tables",
]

_log = logging.getLogger(__name__)


class PipelineUnavailable(Exception):
    """The export was not accepted; the sender should retry later (transient)."""


class PipelineFull(PipelineUnavailable):
    """The disk budget for spans not yet in ClickHouse is used up; retry later."""


@dataclass(frozen=True)
class PipelineConfig:
    """Group commit: a log record closes when its oldest export is ``flush_interval_ms``
    old or ``max_batch_spans`` spans wait; its exports are acknowledged once it is
    fsynced. Block inserts: the inserter writes the records waiting for ClickHouse as
    one block once the oldest has waited ``insert_interval_ms`` or they hold
    ``max_block_bytes`` (log record bytes; a single larger record is a block of its
    own); the rows of ``held_blocks`` blocks' worth of records are kept decoded, a
    backlog beyond that is decoded again from the log when its block comes. A transient
    insert failure is retried forever, ``retry_backoff_ms`` doubling up to
    ``max_retry_backoff_ms``, jittered as every retry loop of the collector is
    (:func:`.retry.backoff_s`); at shutdown the inserter gives up after
    ``shutdown_timeout_s`` and leaves the rest in the log."""

    flush_interval_ms: float = 20.0
    max_batch_spans: int = 20_000
    insert_interval_ms: float = 1000.0
    max_block_bytes: int = 16 << 20
    held_blocks: int = 4
    retry_backoff_ms: float = 200.0
    max_retry_backoff_ms: float = 5_000.0
    queue_exports: int = 1_000
    shutdown_timeout_s: float = 10.0

    def validate(self) -> None:
        if self.flush_interval_ms < 0:
            raise ValueError(f"flush_interval_ms must be >= 0, got {self.flush_interval_ms!r}")
        if self.max_batch_spans < 1:
            raise ValueError(f"max_batch_spans must be >= 1, got {self.max_batch_spans!r}")
        if self.insert_interval_ms < 0:
            raise ValueError(f"insert_interval_ms must be >= 0, got {self.insert_interval_ms!r}")
        if self.max_block_bytes < 1:
            raise ValueError(f"max_block_bytes must be >= 1, got {self.max_block_bytes!r}")
        if self.held_blocks < 1:
            raise ValueError(f"held_blocks must be >= 1, got {self.held_blocks!r}")
        if self.retry_backoff_ms <= 0:
            raise ValueError(f"retry_backoff_ms must be > 0, got {self.retry_backoff_ms!r}")
        if self.max_retry_backoff_ms < self.retry_backoff_ms:
            raise ValueError(
                f"max_retry_backoff_ms ({self.max_retry_backoff_ms!r}) must be >= "
                f"retry_backoff_ms ({self.retry_backoff_ms!r})"
            )
        if self.queue_exports < 1:
            raise ValueError(f"queue_exports must be >= 1, got {self.queue_exports!r}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s!r}")


def store_tables(batch: SpanBatch, rows: DerivedRows) -> list[tuple[str, Mapping[str, Column]]]:
    """The tables a batch's rows go into, with their columns, in insert order (a token
    span's resource before the token spans that name it)."""
    tables: list[tuple[str, Mapping[str, Column]]] = [("otel_spans", batch.otel_spans_columns())]
    if batch.packed_spans:
        tables.append(("token_emissions", batch.packed))
    if batch.tokens.rows:
        tables.append(("token_span_resources", batch.tokens.resources()))
        tables.append(("token_spans", batch.tokens.columns()))
    tables.extend(rows.tables().items())
    return tables


class Consumer(Protocol):
    """What a receiver hands each export to (the pipeline): the serialized request as it
    came over the wire, answered with what was accepted, or an exception (see
    :meth:`Pipeline.consume`)."""

    def consume(self, request: bytes) -> ExportResult: ...


@dataclass(frozen=True)
class ExportResult:
    """What happened to one export: spans accepted, and spans rejected with why."""

    stored_spans: int
    rejected_spans: int
    error_message: str


@dataclass
class _Pending:
    """One export on its way into the log."""

    batch: SpanBatch
    rows: DerivedRows
    digest: bytes  # of the request as received
    wire: bytes  # the accepted spans, serialized: what the log holds
    future: Future[None] = field(default_factory=Future)


@dataclass
class _Record:
    """One log record on its way into ClickHouse. ``batch``/``rows`` are None when they
    are not kept in memory (replay, a backlog past the memory bound): read back from the
    log when its block comes."""

    seq: int
    spans: int
    size: int  # payload bytes in the log
    batch: SpanBatch | None
    rows: DerivedRows | None
    # time.monotonic() when logged (for records found at start: the start), for the lag
    logged_s: float = field(default_factory=time.monotonic)


_STOP = object()
_ENQUEUE_TIMEOUT_S = 5.0
# Digests of the exports accepted last, to recognise a sender's retry of one of them.
_RECENT_EXPORTS = 16_384
# One block's inserts into every table: a few ms embedded, up to seconds on a busy server.
INSERT_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class Pipeline:
    """Thread-safe. ``consume`` may be called from any number of threads; it blocks for
    up to one flush interval plus the fsync and (normally) the insert time. The store and
    the log are borrowed, not owned. Other exporters (the OTLP forwarders) read the log
    themselves, each from its own cursor (:class:`~.forward.OtlpForwarder`)."""

    def __init__(
        self, store: Store, wal: WriteAheadLog, config: PipelineConfig | None = None
    ) -> None:
        self.config = config or PipelineConfig()
        self.config.validate()
        self._store = store
        self._wal = wal
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.config.queue_exports)
        self._writer: threading.Thread | None = None
        self._inserter: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._accepting = False
        self._stopped = False
        # The inserter's work: log records in sequence order, and the payload bytes of
        # those whose rows are kept decoded in memory.
        self._records: collections.deque[_Record] = collections.deque()
        self._records_cv = threading.Condition()
        self._held_bytes = 0
        # At start: the block a crash interrupted (insert it again exactly), and the
        # last record of a log written record by record (insert those one at a time).
        self._resumed_block: tuple[int, int] | None = None
        self._singles_until = 0
        self._stored_seq = 0  # the newest record in ClickHouse (or dropped)
        self._flush_to = 0  # records up to here are inserted without waiting (flush)
        self._writer_done = False
        self._give_up_at: float | None = None
        self._recent: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._recent_lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self._duplicates = 0
        self._received = 0
        self._stored = 0
        self._rejected = 0
        self._refused = 0
        self._lost = 0
        self._packed = 0
        self._store_errors = 0
        self._replayed = 0
        self._last_store_error = ""
        # Not registered anywhere: whoever serves metrics collects it (service.py).
        self.insert_duration = Histogram(
            "tokentrace_collector_insert_duration_seconds",
            "Time to insert one write-ahead log record (one group commit) into every "
            "ClickHouse table it has rows for (reading it back from the log first when "
            "it was not kept in memory); successful inserts only.",
            buckets=INSERT_BUCKETS_S,
            registry=None,
        )

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Queue the log's records from earlier runs for insertion, start the threads;
        idempotent."""
        with self._state_lock:
            if self._writer is not None or self._stopped:
                return
            for _seq, payload in self._wal.records():
                for digest, _wire in decode_record(payload)[1]:
                    self._remember(digest)
            block = self._wal.block()
            if block is not None and block[1] > self._wal.position(STORE_READER):
                # Every record before a block was stored before the block was begun.
                self._wal.commit(block[0] - 1, STORE_READER)
                self._resumed_block = block
            self._stored_seq = self._wal.position(STORE_READER)
            backlog = self._wal.pending(STORE_READER)
            if block is None and backlog:
                # Inserted record by record, under the tokens such a collector used.
                self._singles_until = backlog[-1]
            for seq in backlog:
                self._records.append(_Record(seq, 0, self._wal.size(seq), None, None))
            self._replayed = len(backlog)
            self._writer = threading.Thread(
                target=self._run_writer, name="tokentrace-wal", daemon=True
            )
            self._inserter = threading.Thread(
                target=self._run_inserter, name="tokentrace-insert", daemon=True
            )
            self._accepting = True
            self._writer.start()
            self._inserter.start()

    def shutdown(self) -> None:
        """Stop accepting; log everything accepted; insert what ClickHouse takes within
        ``shutdown_timeout_s`` (the rest stays in the log for the next start).

        Idempotent and safe without :meth:`start`.
        """
        with self._state_lock:
            if self._stopped:
                return
            self._stopped = True
            self._accepting = False
            writer, inserter = self._writer, self._inserter
        if writer is not None:
            self._queue.put(_STOP)
            writer.join()
        if inserter is not None:
            with self._records_cv:
                self._writer_done = True
                self._give_up_at = time.monotonic() + self.config.shutdown_timeout_s
                self._records_cv.notify_all()
            inserter.join()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Insert every export acknowledged so far without waiting for the insert
        interval, and wait until it is in ClickHouse: True then, False if that took
        longer than ``timeout_s`` (ClickHouse failing, say; nothing is lost either way)."""
        target = self._wal.last_seq
        with self._records_cv:
            self._flush_to = max(self._flush_to, target)
            self._records_cv.notify_all()
            return self._records_cv.wait_for(
                lambda: self._stored_seq >= target or not self._records, timeout_s
            )

    # -- counters ------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """``spans_received`` (valid + rejected, packed token spans counted expanded),
        ``spans_stored``, ``spans_rejected``, ``spans_refused`` (valid spans of exports
        refused as transient failures: the sender retries them), ``spans_lost``
        (acknowledged, then refused by ClickHouse as permanently bad: never expected),
        ``packed_decode_spans``, ``exports_deduplicated`` (exports sent again after
        being accepted, acknowledged without storing them twice), and the log's state:
        ``wal_pending_records``, ``wal_pending_bytes``, ``wal_max_bytes``,
        ``wal_replayed_records`` (found at start), ``queued_exports`` (decoded exports
        waiting for the log writer, at most ``queue_exports``), ``store_lag_s`` (how
        long the oldest record not yet in ClickHouse has waited, 0 when none waits; a
        record found in the log at start counts from the start), ``store_errors`` and
        ``store_ok`` (the last insert worked; else ``store_error`` says what failed)."""
        with self._counter_lock:
            out: dict[str, Any] = {
                "spans_received": self._received,
                "spans_stored": self._stored,
                "spans_rejected": self._rejected,
                "spans_refused": self._refused,
                "spans_lost": self._lost,
                "packed_decode_spans": self._packed,
                "store_errors": self._store_errors,
                "wal_replayed_records": self._replayed,
                "exports_deduplicated": self._duplicates,
            }
            last_error = self._last_store_error
        with self._records_cv:
            out["store_ok"] = not last_error
            out["wal_pending_records"] = len(self._records)
            oldest = self._records[0].logged_s if self._records else None
        out["store_lag_s"] = 0.0 if oldest is None else max(0.0, time.monotonic() - oldest)
        out["wal_pending_bytes"] = self._wal.pending_bytes
        out["wal_max_bytes"] = self._wal.config.max_bytes
        out["queued_exports"] = self._queue.qsize()
        if last_error:
            out["store_error"] = last_error
        return out

    # -- the stage -----------------------------------------------------------------

    def consume(self, request: bytes) -> ExportResult:
        """Decode, derive and log one export (a serialized ExportTraceServiceRequest, as
        it came over the wire); return once it is stored or durable.

        Raises :class:`~tokentrace.collector.ingest.decode.DecodeError` for an
        unparsable request (permanent), :class:`PipelineFull` past the disk budget and
        :class:`PipelineUnavailable` when it could not be logged (transient: the sender
        should retry).
        """
        wire = bytes(request)
        # One clock reading for decoding and for the accepted copy the log keeps, so the
        # spans logged are exactly the spans decoded.
        now_ns = time.time_ns()
        batch = decode_wire(wire, now_ns=now_ns)
        digest = export_digest(wire)
        with self._counter_lock:
            self._received += batch.expanded_spans + batch.rejected_spans
            self._rejected += batch.rejected_spans
            self._packed += batch.packed_spans
        accepted = batch.accepted_spans
        if accepted == 0:
            return ExportResult(0, batch.rejected_spans, batch.error_message)
        with self._recent_lock:
            again = digest in self._recent
        if again:
            # A sender retrying an export whose acknowledgement it never got (a crash or
            # a timeout): its spans are already in the log, storing them again would
            # duplicate them.
            with self._counter_lock:
                self._duplicates += 1
            return ExportResult(accepted, batch.rejected_spans, batch.error_message)
        if self._wal.pending_bytes >= self._wal.config.max_bytes:
            self._refuse(batch)
            raise PipelineFull(
                f"collector's disk budget is full: {self._wal.pending_bytes} bytes of spans "
                f"are waiting for ClickHouse or a forward target (limit "
                f"{self._wal.config.max_bytes}); retry later"
            )
        if batch.rejected_spans:
            wire = accepted_request(parse_protobuf(wire), now_ns=now_ns).SerializeToString()
        pending = _Pending(batch, derive_rows(batch), digest, wire)
        try:
            self._enqueue(pending)
            pending.future.result()
        except PipelineUnavailable:
            self._refuse(batch)
            raise
        self._remember(digest)
        return ExportResult(accepted, batch.rejected_spans, batch.error_message)

    def _remember(self, digest: bytes) -> None:
        with self._recent_lock:
            self._recent[digest] = None
            if len(self._recent) > _RECENT_EXPORTS:
                self._recent.popitem(last=False)

    def _refuse(self, batch: SpanBatch) -> None:
        with self._counter_lock:
            self._refused += batch.expanded_spans

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

    # -- the log writer thread --------------------------------------------------------

    def _run_writer(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            group: list[_Pending] = [first]
            spans = first.batch.expanded_spans
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
                spans += item.batch.expanded_spans
            self._log_group(group, spans)
        # Log whatever raced in before the stop marker.
        leftover: list[_Pending] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                leftover.append(item)
        if leftover:
            self._log_group(leftover, sum(p.batch.expanded_spans for p in leftover))

    def _log_group(self, group: list[_Pending], spans: int) -> None:
        payload = encode_record(time.time_ns(), [(p.digest, p.wire) for p in group])
        try:
            seq = self._wal.append(payload)
        except Exception as exc:  # WalError, or a bug: either way exporters get an answer
            _log.error("writing %d spans to the write-ahead log failed: %s", spans, exc)
            error = PipelineUnavailable(f"cannot write the collector's write-ahead log: {exc}")
            for pending in group:
                pending.future.set_exception(error)
            return
        record = _Record(seq, spans, len(payload), SpanBatch(), DerivedRows())
        assert record.batch is not None and record.rows is not None
        for pending in group:  # merged outside the lock the inserter waits on
            record.batch.extend(pending.batch)
            record.rows.extend(pending.rows)
        with self._records_cv:
            held = self.config.held_blocks * self.config.max_block_bytes
            if self._held_bytes + record.size <= held:
                self._held_bytes += record.size
            else:  # a backlog: read back from the log when its block comes
                record.batch = record.rows = None
            self._records.append(record)
            self._records_cv.notify_all()
        # Durable: the exporters are told so now, whatever ClickHouse is doing (and only
        # now that the inserter has the record, so a flush after the answer waits for it).
        for pending in group:
            pending.future.set_result(None)

    # -- the inserter thread ----------------------------------------------------------

    def _next_block(self) -> list[_Record] | None:
        """Wait for the next block (None: shut down, nothing left): records from the
        front of the queue, once the oldest has waited ``insert_interval_ms`` or they
        hold ``max_block_bytes``."""
        interval_s = self.config.insert_interval_ms / 1000.0
        limit = self.config.max_block_bytes
        with self._records_cv:
            while True:
                if not self._records:
                    if self._writer_done:
                        return None
                    self._records_cv.wait()
                    continue
                first = self._records[0]
                if self._resumed_block is not None:
                    low, high = self._resumed_block
                    self._resumed_block = None
                    if first.seq == low:
                        return [r for r in self._records if r.seq <= high]
                if first.seq <= self._singles_until:
                    return [first]
                total = 0
                block: list[_Record] = []
                for record in self._records:
                    if block and total + record.size > limit:
                        break
                    block.append(record)
                    total += record.size
                full = len(block) < len(self._records) or total >= limit
                wait_s = first.logged_s + interval_s - time.monotonic()
                if full or wait_s <= 0 or self._writer_done or self._flush_to >= first.seq:
                    return block
                self._records_cv.wait(wait_s)

    def _run_inserter(self) -> None:
        while True:
            block = self._next_block()
            if block is None:
                return
            first, last = block[0].seq, block[-1].seq
            attempt = 0  # failed attempts at this block, in a row
            begun = False
            while True:
                started = time.perf_counter()
                try:
                    if not begun:
                        self._wal.begin_block(first, last)
                        begun = True
                    self._insert(block)
                except (StoreError, WalError) as exc:
                    if isinstance(exc, WalError) or exc.transient:
                        self._on_store_down(exc)
                        attempt += 1
                        delay_s = jittered_backoff_s(
                            attempt,
                            self.config.retry_backoff_ms / 1000.0,
                            self.config.max_retry_backoff_ms / 1000.0,
                        )
                        if self._wait_or_give_up(delay_s):
                            return
                        continue
                    self._drop_bad_block(block, exc)
                except Exception as exc:  # a bug here must not stop the inserter for good
                    _log.exception("inserting write-ahead log records %d-%d failed", first, last)
                    self._drop_bad_block(block, exc)
                else:
                    self.insert_duration.observe(time.perf_counter() - started)
                    self._on_stored(block)
                break
            with self._records_cv:
                for _ in block:
                    record = self._records.popleft()
                    if record.batch is not None:
                        self._held_bytes -= record.size
                    record.batch = record.rows = None
                self._stored_seq = last
                self._records_cv.notify_all()

    def _token(self, block: list[_Record], table: str) -> str:
        """The block's insert deduplication token for ``table``: a block of one record
        has the token a collector inserting record by record gave that record."""
        first, last = block[0].seq, block[-1].seq
        span = f"{first}" if first == last else f"{first}-{last}"
        return f"tokentrace-wal:{self._wal.log_id}:{span}:{table}"

    def _insert(self, block: list[_Record]) -> None:
        batch, rows = SpanBatch(), DerivedRows()
        for record in block:
            part, part_rows = self._decoded(record)
            batch.extend(part)
            rows.extend(part_rows)
        for table, columns in store_tables(batch, rows):
            self._store.insert(table, columns, dedup_token=self._token(block, table))

    def _decoded(self, record: _Record) -> tuple[SpanBatch, DerivedRows]:
        """The record's rows: kept in memory, else rebuilt from the log."""
        if record.batch is not None and record.rows is not None:
            return record.batch, record.rows
        written_ns, exports = decode_record(self._wal.read(record.seq))
        batch, rows = SpanBatch(), DerivedRows()
        for _digest, wire in exports:
            # The time bounds as they were when these spans were accepted: a replay a
            # day later must not reject what was acknowledged.
            part = decode_wire(wire, now_ns=written_ns)
            batch.extend(part)
            rows.extend(derive_rows(part))
        record.spans = batch.expanded_spans
        return batch, rows

    def _on_stored(self, block: list[_Record]) -> None:
        self._wal.commit(block[-1].seq, STORE_READER)
        with self._counter_lock:
            self._stored += sum(r.spans for r in block)
            self._last_store_error = ""

    def _on_store_down(self, exc: Exception) -> None:
        with self._counter_lock:
            first = not self._last_store_error
            self._store_errors += 1
            self._last_store_error = str(exc)
        if first:
            _log.error(
                "ClickHouse is failing (%s); accepted spans wait in the write-ahead log "
                "(%d bytes) and inserts are retried",
                exc,
                self._wal.pending_bytes,
            )

    def _wait_or_give_up(self, delay_s: float) -> bool:
        """Sleep ``delay_s`` before the next attempt (less if shutdown's deadline comes
        first); True when that deadline has passed."""
        wake = time.monotonic() + delay_s
        with self._records_cv:
            while True:
                deadline = self._give_up_at
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    _log.error(
                        "shutting down with %d records (%d bytes) not in ClickHouse: they "
                        "stay in the write-ahead log and are inserted at the next start",
                        len(self._records),
                        self._wal.pending_bytes,
                    )
                    return True
                until = wake if deadline is None else min(wake, deadline)
                if now >= until:
                    return False
                self._records_cv.wait(until - now)  # shutdown's notify wakes it early

    def _drop_bad_block(self, block: list[_Record], exc: BaseException) -> None:
        """ClickHouse refuses the block's rows for good (or they cannot be rebuilt):
        retrying cannot help, and it must not block everything after it. Its exports
        were acknowledged: count them lost (never expected: decode checks what
        ClickHouse would refuse)."""
        self._wal.commit(block[-1].seq, STORE_READER)
        spans = sum(r.spans for r in block)
        with self._counter_lock:
            self._lost += spans
        _log.error(
            "write-ahead log records %d-%d (%d spans) dropped: ClickHouse refuses them "
            "permanently: %s",
            block[0].seq,
            block[-1].seq,
            spans,
            exc,
        )
