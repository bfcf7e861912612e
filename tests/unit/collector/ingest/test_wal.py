"""The write-ahead log on a temporary directory: records survive reopening, a torn tail
is cut off, committed segments go away, and one process owns a directory."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tokentrace.collector.ingest.logrecord import decode_record, encode_record, export_digest
from tokentrace.collector.ingest.wal import (
    STORE_READER,
    LogReader,
    WalConfig,
    WalError,
    WriteAheadLog,
)


def _open(path: Path, **kwargs: int) -> WriteAheadLog:
    return WriteAheadLog(WalConfig(str(path), **kwargs))


def _segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.wal"))


def test_records_survive_reopening_until_committed(tmp_path: Path) -> None:
    log = _open(tmp_path)
    seqs = [log.append(f"record {i}".encode()) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert log.pending_bytes == sum(len(f"record {i}") for i in range(5))
    log.commit(2)
    assert log.pending() == [3, 4, 5]
    log_id = log.log_id
    log.close()

    log = _open(tmp_path)
    assert log.log_id == log_id
    assert log.pending() == [3, 4, 5]
    assert [log.read(s) for s in log.pending()] == [b"record 2", b"record 3", b"record 4"]
    assert log.append(b"after") == 6  # numbering continues
    log.commit(6)
    assert log.pending() == [] and log.pending_bytes == 0
    log.close()
    assert _open(tmp_path).pending() == []


def test_a_torn_tail_is_cut_off_and_appending_goes_on(tmp_path: Path) -> None:
    log = _open(tmp_path)
    log.append(b"whole")
    log.close()
    (segment,) = _segments(tmp_path)
    good = segment.stat().st_size
    with open(segment, "ab") as f:  # a crash in the middle of writing the next record
        f.write(b"\x40\x00\x00\x00\x01\x02\x03")
    log = _open(tmp_path)
    assert log.pending() == [1]
    assert segment.stat().st_size == good
    assert log.append(b"next") == 2
    log.close()
    log = _open(tmp_path)
    assert [log.read(s) for s in log.pending()] == [b"whole", b"next"]
    log.close()


def test_a_flipped_bit_in_an_old_segment_is_an_error_naming_it(tmp_path: Path) -> None:
    log = _open(tmp_path, segment_bytes=64)
    for i in range(4):
        log.append(bytes([i]) * 80)  # one record per segment
    log.close()
    oldest = _segments(tmp_path)[0]
    data = bytearray(oldest.read_bytes())
    data[-1] ^= 1
    oldest.write_bytes(bytes(data))
    with pytest.raises(WalError, match=f"{oldest.name}.*checksum mismatch"):
        _open(tmp_path)


def test_committed_segments_are_deleted(tmp_path: Path) -> None:
    log = _open(tmp_path, segment_bytes=100)
    for _ in range(6):
        log.append(bytes(90))  # each fills a segment
    assert len(_segments(tmp_path)) == 6
    log.commit(4)
    # Segments holding only committed records are gone but for the newest two, which
    # tell the next start what was accepted last.
    assert [int(p.stem) for p in _segments(tmp_path)] == [5, 6]
    log.commit(6)
    assert [int(p.stem) for p in _segments(tmp_path)] == [5, 6]
    log.close()
    log = _open(tmp_path, segment_bytes=100)
    assert log.pending() == []
    assert [seq for seq, _ in log.records()] == [5, 6]
    log.close()


def test_one_process_owns_a_directory(tmp_path: Path) -> None:
    log = _open(tmp_path)
    with pytest.raises(WalError, match="in use by another collector"):
        _open(tmp_path)
    log.close()
    _open(tmp_path).close()


def test_bad_config_and_checkpoint_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        _open(tmp_path, max_bytes=0)
    (tmp_path / "CHECKPOINT").write_text("twelve\n")
    with pytest.raises(WalError, match="CHECKPOINT"):
        _open(tmp_path)


def test_record_payload_round_trips() -> None:
    exports = [(export_digest(w), w) for w in (b"", b"one", bytes(range(256)))]
    assert decode_record(encode_record(123, exports)) == (123, exports)
    with pytest.raises(ValueError, match="after its exports"):
        decode_record(encode_record(1, exports[:1]) + b"junk")


# -- readers: each exporter's own cursor ---------------------------------------------------

FORWARD = LogReader("forward-a", starts_at_end=True)


def _open_readers(path: Path, *readers: LogReader) -> WriteAheadLog:
    return WriteAheadLog(WalConfig(str(path)), readers=(LogReader(STORE_READER), *readers))


def test_a_record_stays_until_every_reader_has_passed_it(tmp_path: Path) -> None:
    log = _open_readers(tmp_path, FORWARD)
    seqs = [log.append(b"x" * 10) for _ in range(3)]
    log.commit(3, STORE_READER)
    assert log.pending(STORE_READER) == [] and log.pending(FORWARD.name) == seqs
    assert log.pending_bytes == 30  # the forward target has had none of them
    assert log.read(1) == b"x" * 10
    log.commit(2, FORWARD.name)
    assert log.pending_bytes == 10 and log.pending_count(FORWARD.name) == 1
    log.close()

    log = _open_readers(tmp_path, FORWARD)  # cursors survive a restart
    assert log.position(STORE_READER) == 3 and log.position(FORWARD.name) == 2
    assert log.pending(FORWARD.name) == [3] and log.pending(STORE_READER) == []
    assert (tmp_path / f"CHECKPOINT.{FORWARD.name}").read_text() == "2\n"
    log.close()


def test_a_new_forward_reader_starts_at_the_end_and_the_store_at_the_start(
    tmp_path: Path,
) -> None:
    log = _open(tmp_path)
    log.append(b"before")
    log.close()
    log = _open_readers(tmp_path, FORWARD)
    assert log.pending(FORWARD.name) == [] and log.pending(STORE_READER) == [1]
    assert log.append(b"after") == 2
    assert log.pending(FORWARD.name) == [2]
    log.close()


def test_an_unconfigured_readers_cursor_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = _open_readers(tmp_path, FORWARD)
    log.append(b"one")
    log.commit(1, STORE_READER)
    log.close()
    log = _open(tmp_path)  # the forward target was dropped from the configuration
    assert log.pending_bytes == 0 and log.pending() == []
    assert f"CHECKPOINT.{FORWARD.name} belongs to an exporter that is not configured" in (
        caplog.text
    )
    log.close()


def test_numbering_never_goes_back_below_a_cursor(tmp_path: Path) -> None:
    log = _open(tmp_path)
    for _ in range(4):
        log.append(b"r")
    log.commit(4)
    log.close()
    for segment in _segments(tmp_path):
        segment.unlink()  # lost or moved aside by an operator
    log = _open(tmp_path)
    assert log.append(b"next") == 5  # 1-4 again would reuse ClickHouse insert tokens
    log.close()


def test_a_reader_waiting_for_records_wakes_when_one_is_appended(tmp_path: Path) -> None:
    log = _open_readers(tmp_path, FORWARD)
    assert log.wait_for_records(FORWARD.name, 0.01) is False
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(log.wait_for_records(FORWARD.name, 30)))
    waiter.start()
    log.append(b"now")
    waiter.join(timeout=30)
    assert woke == [True]
    log.close()


@pytest.mark.parametrize(
    ("readers", "named"),
    [
        ((LogReader(STORE_READER), LogReader(STORE_READER)), "distinct"),
        ((), "distinct"),
        ((LogReader("../up"),), "'../up'"),
        ((LogReader(""),), "''"),
    ],
)
def test_reader_names_are_checked(
    tmp_path: Path, readers: tuple[LogReader, ...], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        WriteAheadLog(WalConfig(str(tmp_path)), readers=readers)
    assert not list(tmp_path.glob("CHECKPOINT*"))


def test_an_unknown_reader_is_a_key_error_naming_it(tmp_path: Path) -> None:
    log = _open(tmp_path)
    with pytest.raises(KeyError, match="'nobody' is not a reader"):
        log.pending("nobody")
    log.close()
