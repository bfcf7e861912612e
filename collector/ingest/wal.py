"""The write-ahead log: accepted exports on local disk until every exporter has them.

The collector acknowledges an export once its spans are in this log and fsynced, so a
crash (``kill -9``) or an outage of ClickHouse or of a forward target loses nothing that
was acknowledged. Each record is one group commit: an opaque payload with a sequence
number. Each exporter is a *reader* of the log with its own persisted cursor: the
ClickHouse writer (:data:`STORE_READER`) and one per OTLP forward target read records in
sequence order at their own pace and :meth:`WriteAheadLog.commit` each one they have
delivered; :meth:`WriteAheadLog.pending` lists what a reader has not committed yet, also
after a restart. A record stays on disk until every reader has passed it, and
``pending_bytes`` (what the disk budget limits) counts those records: a sink that is
down holds back only its own cursor, until the budget is full.

Layout of the directory::

    LOCK                    flock'ed by the owning process (one collector per log)
    ID                      random id of this log, part of ClickHouse insert tokens
    CHECKPOINT              the ClickHouse writer's cursor: highest committed sequence
    CHECKPOINT.<reader>     every other reader's cursor (``forward-…`` for a target)
    BLOCK                   the records the ClickHouse writer is inserting as one block
    00000000000000000001.wal  segments, named by their first sequence number

A segment is an 8-byte magic followed by records ``<length u32> <crc32 u32> <seq u64>
<payload>``; the CRC covers the sequence number and the payload. A record cut short by a
crash (the only place one can be: the end of the newest segment, and its export was
never acknowledged) is truncated away on open. Segments are ``segment_bytes`` or a
little more, and deleted once every reader has committed every record in them, except
the newest two.

A reader the log has no cursor for starts where :class:`LogReader` says: the ClickHouse
writer at the beginning (a log whose first checkpoint was never written is replayed
whole), a newly added forward target at the end (it gets what arrives from now on, not
the history). The cursor file of a reader that is no longer configured is ignored and
holds nothing back.

The checkpoints are not fsynced: after a crash one can be behind, and records between it
and the truth are delivered again. The ClickHouse writer makes that harmless by
inserting every record with the same insert deduplication tokens both times; a forward
target can receive the record it was being sent at the crash twice (at least once).
The ClickHouse writer inserts several records at a time (a block) under tokens made of
the block's first and last sequence numbers, so it names each block in ``BLOCK``,
fsynced, before inserting it (:meth:`WriteAheadLog.begin_block`): after a crash the
same block is inserted again under the same tokens, and every record before it was
stored (a block is begun only once the one before it is in ClickHouse).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["STORE_READER", "LogReader", "WalConfig", "WalError", "WriteAheadLog"]

_log = logging.getLogger(__name__)

_MAGIC = b"TTWAL01\n"
_HEADER = struct.Struct("<IIQ")  # payload length, crc32(seq + payload), seq
_SEQ = struct.Struct("<Q")
_SUFFIX = ".wal"
MAX_RECORD_BYTES = 1 << 31
_RETAINED_SEGMENTS = 2
_CHECKPOINT = "CHECKPOINT"
_BLOCK = "BLOCK"
_READER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")

#: The ClickHouse writer's reader name; its cursor is the ``CHECKPOINT`` file.
STORE_READER = "clickhouse"


class WalError(Exception):
    """The log cannot be opened or written (disk full, I/O error, in use elsewhere)."""


@dataclass(frozen=True)
class WalConfig:
    """``directory`` holds the log; ``max_bytes`` is the disk budget for records some
    reader has not had yet (beyond it the collector refuses exports with retryable errors);
    ``fsync`` is off only for benchmarks that measure what it costs."""

    directory: str
    max_bytes: int = 1 << 30
    segment_bytes: int = 64 << 20
    fsync: bool = True

    def validate(self) -> None:
        if not self.directory:
            raise ValueError("the write-ahead log needs a directory")
        if self.max_bytes < 1:
            raise ValueError(f"WAL max_bytes must be positive, got {self.max_bytes!r}")
        if self.segment_bytes < 1:
            raise ValueError(f"WAL segment_bytes must be positive, got {self.segment_bytes!r}")


@dataclass(frozen=True)
class LogReader:
    """One exporter reading the log from its own cursor. ``name`` is a file-name-safe
    identifier (letters, digits, ``.``, ``_``, ``-``); ``starts_at_end``: without a
    cursor yet, start after the newest record instead of at the oldest."""

    name: str
    starts_at_end: bool = False

    def validate(self) -> None:
        if not _READER_NAME.fullmatch(self.name):
            raise ValueError(
                f"log reader name {self.name!r} must be 1-200 letters, digits, '.', '_' "
                "or '-', starting with a letter or digit"
            )


@dataclass
class _Segment:
    first_seq: int
    path: Path
    last_seq: int = 0  # 0: no records yet


@dataclass(frozen=True)
class _Location:
    segment: _Segment
    offset: int  # of the payload
    length: int


class WriteAheadLog:
    """Thread-safe; one process owns a directory from construction to :meth:`close`.

    :meth:`append` and :meth:`commit` block on disk I/O. ``readers`` are the exporters
    that read the log (by default only the ClickHouse writer); ``pending_bytes`` counts
    the payload bytes of records some reader has not committed (what the disk budget
    limits).
    """

    def __init__(
        self, config: WalConfig, readers: Sequence[LogReader] = (LogReader(STORE_READER),)
    ) -> None:
        config.validate()
        for reader in readers:
            reader.validate()
        names = [r.name for r in readers]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"the log needs distinct reader names, got {names!r}")
        self.config = config
        self.readers = tuple(readers)
        self.directory = Path(config.directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise WalError(f"cannot open write-ahead log {self.directory}: {exc}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise WalError(
                f"write-ahead log {self.directory} is in use by another collector; "
                "give this one its own --wal-dir"
            ) from None
        self._mutex = threading.Lock()
        self._appended = threading.Condition(self._mutex)
        self._closed = False
        self._file: int | None = None  # the newest segment, open for appending
        self._file_bytes = 0
        self._segments: list[_Segment] = []
        self._index: dict[int, _Location] = {}
        self.pending_bytes = 0
        try:
            self.log_id = self._read_or_create_id()
            found = {r.name: self._read_checkpoint(r.name) for r in readers}
            # What every reader has passed: nothing older is indexed or kept.
            self._committed = min((s for s in found.values() if s is not None), default=0)
            if any(
                s is None and not r.starts_at_end
                for r, s in zip(readers, found.values(), strict=True)
            ):
                self._committed = 0
            # Sequence numbers are never reused, even when the segments are gone: the
            # ClickHouse writer's insert tokens are made of them.
            self._highest_cursor = max((s for s in found.values() if s is not None), default=0)
            self._next_seq = self._recover()
            self._cursors = {
                name: (self._next_seq - 1 if seq is None and r.starts_at_end else seq or 0)
                for (name, seq), r in zip(found.items(), readers, strict=True)
            }
            for name, seq in found.items():
                if seq is None:
                    self._write_checkpoint(name, self._cursors[name])
            self._forget_committed()
            self._warn_about_stale_cursors()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- opening ---------------------------------------------------------------------

    def _read_or_create_id(self) -> str:
        path = self.directory / "ID"
        try:
            value = path.read_text().strip()
            if value:
                return value
        except FileNotFoundError:
            pass
        value = secrets.token_hex(8)
        _write_atomically(path, value + "\n", fsync=True)
        return value

    def _checkpoint_path(self, reader: str) -> Path:
        return self.directory / (
            _CHECKPOINT if reader == STORE_READER else f"{_CHECKPOINT}.{reader}"
        )

    def _read_checkpoint(self, reader: str) -> int | None:
        """The reader's cursor, None when it has none yet."""
        path = self._checkpoint_path(reader)
        try:
            return int(path.read_text().strip() or 0)
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise WalError(f"{path} is not a number: {exc}") from exc

    def _write_checkpoint(self, reader: str, seq: int) -> None:
        try:
            _write_atomically(self._checkpoint_path(reader), f"{seq}\n", fsync=False)
        except OSError as exc:  # harmless: a cursor behind only delivers again
            _log.warning("write-ahead log cursor of %s not written: %s", reader, exc)

    def _warn_about_stale_cursors(self) -> None:
        known = {self._checkpoint_path(r.name).name for r in self.readers}
        for path in sorted(self.directory.glob(f"{_CHECKPOINT}.*")):
            if path.name not in known and not path.name.endswith(".tmp"):
                _log.warning(
                    "write-ahead log %s: %s belongs to an exporter that is not configured "
                    "now; it is ignored and holds nothing back",
                    self.directory,
                    path.name,
                )

    def _recover(self) -> int:
        """Index every record after the checkpoint; returns the next sequence number."""
        paths = sorted(p for p in self.directory.iterdir() if p.name.endswith(_SUFFIX))
        next_seq = max(self._committed, self._highest_cursor) + 1
        for k, path in enumerate(paths):
            try:
                first = int(path.name[: -len(_SUFFIX)])
            except ValueError:
                raise WalError(f"unexpected file in the write-ahead log: {path}") from None
            segment = _Segment(first, path)
            newest = k == len(paths) - 1
            good_bytes = self._scan(segment, newest)
            if segment.last_seq == 0 and not newest:
                path.unlink()  # an empty segment left by a crash right after creating it
                continue
            self._segments.append(segment)
            if segment.last_seq:
                next_seq = max(next_seq, segment.last_seq + 1)
            if newest:
                self._open_for_append(segment, good_bytes)
        self._delete_committed_segments()
        if self._index:
            _log.warning(
                "write-ahead log %s: %d records (%d bytes) from a previous run are not "
                "known to have reached every exporter; delivering them again",
                self.directory,
                len(self._index),
                self.pending_bytes,
            )
        return next_seq

    def _scan(self, segment: _Segment, newest: bool) -> int:
        """Index ``segment``'s records; returns the length of its valid prefix. A bad
        record ends the scan: truncated away in the newest segment, an error elsewhere."""
        data = segment.path.read_bytes()
        if len(data) < len(_MAGIC) or not data.startswith(_MAGIC):
            if newest and len(data) < len(_MAGIC) and _MAGIC.startswith(data):
                return 0  # created, crashed before the magic was written
            raise WalError(f"{segment.path} is not a tokentrace write-ahead log segment")
        offset = len(_MAGIC)
        while offset < len(data):
            problem = None
            if offset + _HEADER.size > len(data):
                problem = "header cut short"
            else:
                length, crc, seq = _HEADER.unpack_from(data, offset)
                start = offset + _HEADER.size
                end = start + length
                if end > len(data):
                    problem = "record cut short"
                elif zlib.crc32(data[start:end], zlib.crc32(_SEQ.pack(seq))) != crc:
                    problem = "checksum mismatch"
            if problem:
                if not newest:
                    raise WalError(
                        f"{segment.path} is corrupt at byte {offset} ({problem}); move it "
                        "aside to start without the records it holds from there on"
                    )
                _log.warning(
                    "write-ahead log %s: dropping an unfinished record at byte %d (%s): "
                    "its export was never acknowledged",
                    segment.path,
                    offset,
                    problem,
                )
                return offset
            segment.last_seq = seq
            if seq > self._committed:
                self._index[seq] = _Location(segment, start, length)
                self.pending_bytes += length
            offset = end
        return offset

    def _open_for_append(self, segment: _Segment, good_bytes: int) -> None:
        fd = os.open(segment.path, os.O_RDWR)
        if good_bytes < len(_MAGIC):
            os.ftruncate(fd, 0)
            os.write(fd, _MAGIC)
            good_bytes = len(_MAGIC)
        elif os.fstat(fd).st_size != good_bytes:
            os.ftruncate(fd, good_bytes)
        os.lseek(fd, good_bytes, os.SEEK_SET)
        self._file, self._file_bytes = fd, good_bytes

    # -- use -------------------------------------------------------------------------

    def pending(self, reader: str = STORE_READER) -> list[int]:
        """Sequence numbers appended and not committed by ``reader``, oldest first."""
        with self._mutex:
            cursor = self._cursor(reader)
            return sorted(s for s in self._index if s > cursor)

    def pending_count(self, reader: str) -> int:
        """How many records ``reader`` has not committed."""
        with self._mutex:
            return max(0, self._next_seq - 1 - self._cursor(reader))

    def position(self, reader: str) -> int:
        """The newest sequence number ``reader`` has committed (0: none)."""
        with self._mutex:
            return self._cursor(reader)

    def wait_for_records(self, reader: str, timeout_s: float) -> bool:
        """Block until ``reader`` has a record to read, at most ``timeout_s``; True when
        it has one."""
        with self._appended:
            return (
                self._appended.wait_for(
                    lambda: self._closed or self._next_seq - 1 > self._cursor(reader), timeout_s
                )
                and not self._closed
            )

    @property
    def last_seq(self) -> int:
        """The newest record's sequence number (0: none yet)."""
        with self._mutex:
            return self._next_seq - 1

    def size(self, seq: int) -> int:
        """The payload bytes of record ``seq`` (0 if it is not kept)."""
        with self._mutex:
            location = self._index.get(seq)
            return 0 if location is None else location.length

    def block(self) -> tuple[int, int] | None:
        """The block the ClickHouse writer last began (first and last sequence number),
        None if it never began one in this directory (a new log, or one written by a
        collector that inserted record by record)."""
        path = self.directory / _BLOCK
        try:
            first, last = (int(v) for v in path.read_text().split())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise WalError(f"{path} is not two numbers: {exc}") from exc
        return first, last

    def begin_block(self, first: int, last: int) -> None:
        """The ClickHouse writer is about to insert records ``first``..``last`` as one
        block: durable (fsynced) before it returns."""
        with self._mutex:
            self._check_open()
        try:
            _write_atomically(self.directory / _BLOCK, f"{first} {last}\n", fsync=True)
            _fsync_dir(self.directory)
        except OSError as exc:
            raise WalError(f"cannot write {self.directory / _BLOCK}: {exc}") from exc

    def _cursor(self, reader: str) -> int:
        try:
            return self._cursors[reader]
        except KeyError:
            raise KeyError(f"{reader!r} is not a reader of this log") from None

    def append(self, payload: bytes) -> int:
        """Write one record and make it durable (fsync); returns its sequence number.
        Raises :class:`WalError` (nothing was appended) if the disk refuses."""
        if len(payload) >= MAX_RECORD_BYTES:
            raise WalError(f"a write-ahead log record must be under 2 GiB, got {len(payload)}")
        with self._mutex:
            self._check_open()
            seq = self._next_seq
            try:
                if self._file is None or self._file_bytes >= self.config.segment_bytes:
                    self._roll(seq)
                assert self._file is not None
                header = _HEADER.pack(
                    len(payload), zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))), seq
                )
                offset = self._file_bytes
                _write_all(self._file, header + payload)
                if self.config.fsync:
                    os.fdatasync(self._file)
            except OSError as exc:
                self._undo_partial_write()
                raise WalError(f"cannot write to the write-ahead log: {exc}") from exc
            segment = self._segments[-1]
            segment.last_seq = seq
            self._file_bytes = offset + _HEADER.size + len(payload)
            self._index[seq] = _Location(segment, offset + _HEADER.size, len(payload))
            self.pending_bytes += len(payload)
            self._next_seq = seq + 1
            self._appended.notify_all()
            return seq

    def records(self) -> Iterator[tuple[int, bytes]]:
        """Every record still on disk, committed or not, oldest first: the pending ones
        and those in the newest segments. Reads the files; meant for start-up."""
        with self._mutex:
            segments = list(self._segments)
            limit = self._next_seq
        for segment in segments:
            data = segment.path.read_bytes()
            offset = len(_MAGIC)
            while offset + _HEADER.size <= len(data):
                length, _crc, seq = _HEADER.unpack_from(data, offset)
                start = offset + _HEADER.size
                if seq >= limit or start + length > len(data):
                    break
                yield seq, data[start : start + length]
                offset = start + length

    def read(self, seq: int) -> bytes:
        """The payload of record ``seq``, pending for some reader; KeyError if every
        reader has committed it (or it was never appended)."""
        with self._mutex:
            location = self._index[seq]
        with open(location.segment.path, "rb") as f:
            f.seek(location.offset)
            data = f.read(location.length)
        if len(data) != location.length:
            raise WalError(f"{location.segment.path}: record {seq} is cut short")
        return data

    def commit(self, seq: int, reader: str = STORE_READER) -> None:
        """``reader`` has delivered record ``seq`` (and everything older): move its
        cursor; forget and delete what every reader has passed."""
        with self._mutex:
            self._check_open()
            if seq <= self._cursor(reader):
                return
            self._cursors[reader] = seq
            self._write_checkpoint(reader, seq)
            self._forget_committed()

    def _forget_committed(self) -> None:
        oldest = min(self._cursors.values())
        for done in [s for s in self._index if s <= oldest]:
            self.pending_bytes -= self._index.pop(done).length
        if oldest > self._committed:
            self._committed = oldest
            try:
                self._delete_committed_segments()
            except OSError as exc:  # harmless: the next commit tries again
                _log.warning("write-ahead log segments not deleted: %s", exc)

    def close(self) -> None:
        """Close files and release the directory; idempotent."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._appended.notify_all()
            if self._file is not None:
                os.close(self._file)
                self._file = None
            os.close(self._lock_fd)

    # -- internals -------------------------------------------------------------------

    def _roll(self, first_seq: int) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None
        path = self.directory / f"{first_seq:020d}{_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, _MAGIC)
            if self.config.fsync:
                os.fdatasync(fd)
                _fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._segments.append(_Segment(first_seq, path))
        self._file, self._file_bytes = fd, len(_MAGIC)
        self._delete_committed_segments()

    def _undo_partial_write(self) -> None:
        # A failed write may have left part of a record: cut it off so the next append
        # (once the disk has room again) starts on a record boundary.
        if self._file is not None:
            try:
                os.ftruncate(self._file, self._file_bytes)
                os.lseek(self._file, self._file_bytes, os.SEEK_SET)
            except OSError:
                os.close(self._file)
                self._file = None  # the next append starts a new segment

    def _delete_committed_segments(self) -> None:
        keep: list[_Segment] = []
        for k, segment in enumerate(self._segments):
            # The newest segments stay even when committed: at the next start they tell
            # which exports were accepted just before a crash (see :meth:`records`).
            recent = k >= len(self._segments) - _RETAINED_SEGMENTS
            if not recent and segment.last_seq <= self._committed:
                segment.path.unlink(missing_ok=True)
            else:
                keep.append(segment)
        self._segments = keep

    def _check_open(self) -> None:
        if self._closed:
            raise WalError(f"write-ahead log {self.directory} is closed")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_atomically(path: Path, text: str, *, fsync: bool) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
