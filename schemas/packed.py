"""The packed token wire format: one request's token emissions as one span attribute.

In packed mode a decode node sends no ``llm.token`` spans; its ``llm.decode`` span
carries :data:`tokentrace.schemas.attributes.TOKEN_PACKED` instead, and the collector
expands it into the same ``llm.token`` spans and rows the unpacked mode produces.

The value is ``"2:" + base64(payload)``; the payload, little-endian:

    uint32  n                      emissions
    int64   times[n + 1]           ns from the llm.decode span's start: times[0] is where
                                   the first token span starts (decode start), times[i+1]
                                   is emission i (where token span i ends)
    int64   steps[n]               the engine step of each emission
    uint16  counts[n]              tokens carried by each emission
    uint16  batch_sizes[n]         running requests in that step
    uint32  prefill_tokens[n]      prompt tokens that step also prefilled
                                   (``tokentrace.step.prefill_tokens``)

Version ``"1:"`` is the same without ``prefill_tokens``: what nodes sent before steps
reported their prefill work, and what an emitter that does not know it (the vLLM
plugin) still sends. It stays decodable; its emissions have no prefill count (NULL in
``token_latencies``), which is not the same as a count of 0.

Times are relative to the span's start so whatever moves the span (a clock correction)
moves its tokens with it. 24 bytes per emission before base64 (20 in version 1).
"""

from __future__ import annotations

import base64
import binascii
import struct
import sys
from array import array
from dataclasses import dataclass

__all__ = [
    "PackedTokens",
    "PackedTokensError",
    "decode_packed",
    "encode_packed",
    "token_span_id",
    "token_span_id_sql",
]

# The span id of packed emission i: the decode span's id XOR ((i + 1) * 2^64 / golden
# ratio), mod 2^64, never all zeros. Deterministic, so a re-sent export yields the same
# ids. Defined once, for Python (token_span_id) and for the ClickHouse views that expand
# packed rows (token_span_id_sql).
_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


def token_span_id(decode_span_id: bytes, index: int) -> bytes:
    """The span id of emission ``index`` (0-based) packed on the decode span
    ``decode_span_id`` (8 bytes)."""
    value = int.from_bytes(decode_span_id, "big") ^ (((index + 1) * _GOLDEN64) & _MASK64)
    return (value or 1).to_bytes(8, "big")


def token_span_id_sql(decode_id: str, number: str) -> str:
    """:func:`token_span_id` as a ClickHouse expression (16 lowercase hex digits):
    ``decode_id`` is the decode span's id as a UInt64, ``number`` the emission's 1-based
    number (``index + 1``; UInt64 arithmetic wraps mod 2^64, as the Python masks)."""
    return (
        f"leftPad(lower(hex(greatest(bitXor({decode_id}, {number} * {_GOLDEN64}), "
        "toUInt64(1)))), 16, '0')"
    )


VERSION_PREFIX = "2:"  # what encode_packed writes when it is given prefill_tokens
V1_PREFIX = "1:"
_LITTLE = sys.byteorder == "little"


class PackedTokensError(ValueError):
    """The attribute is not a valid packed-token value; the message says why."""


@dataclass(frozen=True)
class PackedTokens:
    times: array  # int64, n + 1
    steps: array  # int64, n
    counts: array  # uint16, n
    batch_sizes: array  # uint16, n
    prefill_tokens: array | None = None  # uint32, n; None: version 1, not reported

    def __len__(self) -> int:
        return len(self.steps)


def _le(values: array) -> bytes:
    if _LITTLE:
        return values.tobytes()
    swapped = array(values.typecode, values)
    swapped.byteswap()
    return swapped.tobytes()


def encode_packed(
    times: array,
    steps: array,
    counts: array,
    batch_sizes: array,
    prefill_tokens: array | None = None,
) -> str:
    """The attribute value for ``n`` emissions (``times`` has ``n + 1`` entries; typecodes
    ``q``, ``q``, ``H``, ``H``, ``I``): version 2, or version 1 without ``prefill_tokens``
    (an emitter that does not know them)."""
    n = len(steps)
    prefill_n = n if prefill_tokens is None else len(prefill_tokens)
    if not (len(times) == n + 1 and len(counts) == n and len(batch_sizes) == n and prefill_n == n):
        raise ValueError(
            f"packed tokens need n + 1 times and n of the rest, got {len(times)} times, "
            f"{n} steps, {len(counts)} counts, {len(batch_sizes)} batch sizes, "
            f"{prefill_n} prefill counts"
        )
    parts = [struct.pack("<I", n), _le(times), _le(steps), _le(counts), _le(batch_sizes)]
    if prefill_tokens is None:
        return V1_PREFIX + base64.b64encode(b"".join(parts)).decode("ascii")
    if prefill_tokens.typecode != "I":
        prefill_tokens = array("I", prefill_tokens)
    parts.append(_le(prefill_tokens))
    return VERSION_PREFIX + base64.b64encode(b"".join(parts)).decode("ascii")


def _take(payload: bytes, offset: int, typecode: str, count: int) -> tuple[array, int]:
    values = array(typecode)
    end = offset + values.itemsize * count
    values.frombytes(payload[offset:end])
    if not _LITTLE:
        values.byteswap()
    return values, end


def decode_packed(value: str) -> PackedTokens:
    """Parse an attribute value; :class:`PackedTokensError` names what is wrong.

    Checks the version (``"2:"``, or ``"1:"`` without prefill counts), the length
    against the count, and that times never go backwards (every token span ends at or
    after its start). ``times[0]`` may be negative: a token span may start before its
    parent, as in the unpacked mode.
    """
    if value.startswith(VERSION_PREFIX):
        with_prefill = True
    elif value.startswith(V1_PREFIX):
        with_prefill = False
    else:
        raise PackedTokensError(
            f"packed tokens must start with {VERSION_PREFIX!r} or {V1_PREFIX!r}"
        )
    try:
        payload = base64.b64decode(value[2:], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PackedTokensError(f"packed tokens are not valid base64: {exc}") from None
    if len(payload) < 4 + 8:
        raise PackedTokensError(f"packed tokens too short: {len(payload)} bytes")
    (n,) = struct.unpack_from("<I", payload)
    expected = 4 + 8 * (n + 1) + 8 * n + 2 * n + 2 * n + (4 * n if with_prefill else 0)
    if len(payload) != expected:
        raise PackedTokensError(
            f"packed tokens (version {value[0]}) hold {len(payload)} bytes, {expected} "
            f"expected for {n} emissions"
        )
    times, offset = _take(payload, 4, "q", n + 1)
    steps, offset = _take(payload, offset, "q", n)
    counts, offset = _take(payload, offset, "H", n)
    batch_sizes, offset = _take(payload, offset, "H", n)
    prefill_tokens = _take(payload, offset, "I", n)[0] if with_prefill else None
    for i in range(n):
        if times[i + 1] < times[i]:
            raise PackedTokensError(f"packed token {i} ends before it starts")
    return PackedTokens(times, steps, counts, batch_sizes, prefill_tokens)
