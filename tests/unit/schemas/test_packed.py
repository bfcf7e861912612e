"""The packed token wire format: round trip and clear rejections."""

from __future__ import annotations

import base64
import struct
from array import array

import pytest

from tokentrace.schemas.packed import PackedTokensError, decode_packed, encode_packed


def _arrays(n: int) -> tuple[array, array, array, array]:
    times = array("q", [-5] + [1_000 * (i + 1) for i in range(n)])
    steps = array("q", [2**40 + i for i in range(n)])
    counts = array("H", [1 + i % 3 for i in range(n)])
    batch = array("H", [65535 - i for i in range(n)])
    return times, steps, counts, batch


@pytest.mark.parametrize("n", [0, 1, 300])
def test_round_trip(n: int) -> None:
    times, steps, counts, batch = _arrays(n)
    prefill = array("I", [0 if i % 2 else 2**32 - 1 - i for i in range(n)])
    value = encode_packed(times, steps, counts, batch, prefill)
    assert value.startswith("2:")
    assert len(base64.b64decode(value[2:])) == 4 + 8 + 24 * n
    got = decode_packed(value)
    assert len(got) == n
    assert (got.times, got.steps, got.counts, got.batch_sizes) == (times, steps, counts, batch)
    assert got.prefill_tokens == prefill


@pytest.mark.parametrize("n", [0, 1, 300])
def test_version_1_still_decodes_without_prefill_counts(n: int) -> None:
    """Payloads sent before steps reported prefill work (and the vLLM plugin's, which
    cannot know it) decode as before, with no prefill counts rather than zeros."""
    times, steps, counts, batch = _arrays(n)
    value = encode_packed(times, steps, counts, batch)
    assert value.startswith("1:")
    assert len(base64.b64decode(value[2:])) == 4 + 8 + 20 * n
    got = decode_packed(value)
    assert (got.times, got.steps, got.counts, got.batch_sizes) == (times, steps, counts, batch)
    assert got.prefill_tokens is None


def test_encode_checks_lengths() -> None:
    times, steps, counts, batch = _arrays(3)
    with pytest.raises(ValueError, match="n \\+ 1 times"):
        encode_packed(times[:3], steps, counts, batch)
    with pytest.raises(ValueError, match="2 prefill counts"):
        encode_packed(times, steps, counts, batch, array("I", [1, 2]))


def _raw(payload: bytes, version: str = "1:") -> str:
    return version + base64.b64encode(payload).decode()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("3:AAAA", "must start with '2:' or '1:'"),
        ("2:not base64!", "not valid base64"),
        ("1:not base64!", "not valid base64"),
        (_raw(b"\x01\x00"), "too short"),
        (
            _raw(struct.pack("<I", 2) + bytes(8 * 3 + 8 * 2 + 2 * 2 + 2)),
            "version 1\\) hold 50 bytes, 52 expected",
        ),
        # A version 1 payload under the version 2 prefix lacks the prefill counts.
        (
            _raw(struct.pack("<I", 2) + bytes(8 * 3 + 8 * 2 + 2 * 2 + 2 * 2), "2:"),
            "version 2\\) hold 52 bytes, 60 expected",
        ),
        (
            _raw(struct.pack("<I", 1) + struct.pack("<qq", 10, 5) + bytes(8 + 2 + 2)),
            "token 0 ends before it starts",
        ),
    ],
)
def test_malformed_values_are_named(value: str, message: str) -> None:
    with pytest.raises(PackedTokensError, match=message):
        decode_packed(value)
