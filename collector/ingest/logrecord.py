"""What one record of the write-ahead log holds: the exports of one group commit.

The payload is the write time (the clock decoding's time bounds used, so a replay a day
later accepts what was acknowledged), then per export the digest of the request as
received (to recognise a sender's retry of it) and its accepted spans as serialized
OTLP protobuf. Every exporter reads records in this format: the ClickHouse writer
derives rows from them, the OTLP forwarders send the spans on.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

__all__ = ["decode_record", "encode_record", "export_digest"]

_RECORD_HEAD = struct.Struct("<QI")  # written at (ns), number of exports
_LENGTH = struct.Struct("<I")
_DIGEST_BYTES = 16


def export_digest(wire: bytes) -> bytes:
    """What identifies an export when a sender sends it again: a hash of its bytes."""
    return hashlib.blake2b(wire, digest_size=_DIGEST_BYTES).digest()


def encode_record(written_ns: int, exports: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A log record's payload: the write time, then each export's digest (of the
    request as received) and its accepted spans, serialized."""
    parts = [_RECORD_HEAD.pack(written_ns, len(exports))]
    for digest, wire in exports:
        parts.append(digest)
        parts.append(_LENGTH.pack(len(wire)))
        parts.append(wire)
    return b"".join(parts)


def decode_record(payload: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """``(written_ns, [(digest, wire), ...])`` of a payload :func:`encode_record` made."""
    written_ns, count = _RECORD_HEAD.unpack_from(payload, 0)
    offset = _RECORD_HEAD.size
    exports = []
    for _ in range(count):
        digest = payload[offset : offset + _DIGEST_BYTES]
        offset += _DIGEST_BYTES
        (length,) = _LENGTH.unpack_from(payload, offset)
        offset += _LENGTH.size
        exports.append((digest, payload[offset : offset + length]))
        offset += length
    if offset != len(payload):
        raise ValueError(f"log record has {len(payload) - offset} bytes after its exports")
    return written_ns, exports
