"""Columns → one ClickHouse ``Native`` format block, for the store's inserts.

The store's rows arrive column by column, and most of their bytes are arrays of fixed-
width numbers (a packed decode span's emission times, steps, counts) that ``Native``
holds exactly as ``array.array`` lays them out in memory: a block is made of a few
``tobytes()`` and joins, with no Python work per array element. Strings cost one length
prefix each. The same bytes go to a server over HTTP and to the embedded chDB, so both
take one path (:meth:`~tokentrace.collector.store.Store.insert`).

Types are the table's own (``system.columns``), sent as the plain type ClickHouse
converts to it on input: ``LowCardinality(T)`` as ``T``, ``SimpleAggregateFunction(f,
T)`` as ``T``, a map's ``LowCardinality`` keys as ``String``. Values follow
:meth:`Store.insert`'s contract: ``DateTime64`` as integer nanoseconds, maps as dicts,
``Nullable`` values as None or the value.
"""

from __future__ import annotations

import re
import sys
from array import array
from collections.abc import Callable, Mapping, Sequence
from itertools import accumulate, chain, repeat
from typing import Any

__all__ = ["Column", "Encoded", "NativeTypeError", "Repeated", "encode_block", "wire_type"]

_LITTLE = sys.byteorder == "little"
_FIXED = {
    "Int8": "b",
    "UInt8": "B",
    "Int16": "h",
    "UInt16": "H",
    "Int32": "i",
    "UInt32": "I",
    "Int64": "q",
    "UInt64": "Q",
    "Float32": "f",
    "Float64": "d",
}
_WRAPPER = re.compile(r"^(LowCardinality|SimpleAggregateFunction)\((.*)\)$")


class NativeTypeError(TypeError):
    """A column type this encoder does not write."""


class Encoded:
    """A column already in Native layout: ``rows`` values of wire type ``wire_type``, as
    the compiled token-span scanner writes them (``collector/ingest/_tokenscan.c``)."""

    __slots__ = ("data", "rows", "wire_type")

    def __init__(self, data: bytes, rows: int, wire_type: str) -> None:
        self.data = data
        self.rows = rows
        self.wire_type = wire_type

    def __len__(self) -> int:
        return self.rows


class Repeated:
    """A column as runs of one value each, ``(value, count)``: the resource and scope
    columns of token spans, which repeat for every span of an export's scope."""

    __slots__ = ("runs", "rows")

    def __init__(self, runs: Sequence[tuple[Any, int]]) -> None:
        self.runs = list(runs)
        self.rows = sum(n for _value, n in self.runs)

    def __len__(self) -> int:
        return self.rows


def wire_type(table_type: str) -> str:
    """The type a column of ``table_type`` is sent as."""
    t = table_type.strip()
    while True:
        m = _WRAPPER.match(t)
        if m is None:
            break
        inner = m.group(2)
        if m.group(1) == "SimpleAggregateFunction":
            inner = _split_args(inner)[1]
        t = inner.strip()
    if t.startswith("DateTime64"):
        return "DateTime64(9)" if t.startswith("DateTime64(9") else t
    for outer in ("Nullable", "Array"):
        if t.startswith(outer + "("):
            return f"{outer}({wire_type(t[len(outer) + 1 : -1])})"
    if t.startswith("Map("):
        key, value = _split_args(t[4:-1])
        return f"Map({wire_type(key)}, {wire_type(value)})"
    return t


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated arguments of a type."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    out.append(text[start:].strip())
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL_VARINTS = [_varint(n) for n in range(256)]


def _string_bytes(values: Sequence[Any]) -> bytes:
    # Most values repeat within a block (service names, attribute keys, small numbers):
    # each distinct one is encoded once.
    cache: dict[Any, bytes] = {}
    get = cache.get
    parts: list[bytes] = []
    append = parts.append
    small = _SMALL_VARINTS
    for value in values:
        encoded = get(value)
        if encoded is None:
            raw = value.encode() if isinstance(value, str) else bytes(value)
            n = len(raw)
            encoded = cache[value] = (small[n] if n < 256 else _varint(n)) + raw
        append(encoded)
    return b"".join(parts)


def _fixed_bytes(code: str, values: Sequence[Any]) -> bytes:
    if isinstance(values, array) and values.typecode == code:
        data = values
    else:
        data = array(code, values)
    if not _LITTLE:
        data = array(code, data)
        data.byteswap()
    return data.tobytes()


Writer = Callable[[Sequence[Any]], bytes]


def _writer(t: str) -> Writer:
    """What writes a column of wire type ``t``."""
    if t in _FIXED:
        code = _FIXED[t]
        return lambda values: _fixed_bytes(code, values)
    if t == "String":
        return _string_bytes
    if t.startswith("DateTime64("):
        return lambda values: _fixed_bytes("q", values)
    if t.startswith("Nullable("):
        inner_t = t[len("Nullable(") : -1]
        inner = _writer(inner_t)
        blank: Any = "" if inner_t == "String" else 0

        def nullable(values: Sequence[Any]) -> bytes:
            nulls = bytes(1 if v is None else 0 for v in values)
            return nulls + inner([blank if v is None else v for v in values])

        return nullable
    if t.startswith("Array("):
        element = _writer(t[len("Array(") : -1])

        def arrays(values: Sequence[Any]) -> bytes:
            offsets = array("Q", accumulate(len(v) for v in values))
            flat: list[Any] | array
            first = values[0] if values else None
            if isinstance(first, array) and all(
                isinstance(v, array) and v.typecode == first.typecode for v in values
            ):
                flat = array(first.typecode)
                for v in values:
                    flat.extend(v)
            else:
                flat = [x for v in values for x in v]
            return _fixed_bytes("Q", offsets) + element(flat)

        return arrays
    if t.startswith("Map("):
        key_t, value_t = _split_args(t[4:-1])
        keys_w, values_w = _writer(key_t), _writer(value_t)

        def maps(values: Sequence[Mapping[Any, Any]]) -> bytes:
            offsets = array("Q", accumulate(len(m) for m in values))
            keys: list[Any] = []
            vals: list[Any] = []
            for m in values:
                keys.extend(m)
                vals.extend(m.values())
            return _fixed_bytes("Q", offsets) + keys_w(keys) + values_w(vals)

        return maps
    raise NativeTypeError(f"no Native writer for type {t!r}")


#: What a column's values may be: a sequence, or one of the two forms above.
Column = Sequence[Any] | Encoded | Repeated

_WRITERS: dict[str, Writer] = {}


def _cached_writer(t: str) -> Writer:
    writer = _WRITERS.get(t)
    if writer is None:
        writer = _WRITERS[t] = _writer(t)
    return writer


def _repeated_bytes(t: str, runs: Sequence[tuple[Any, int]]) -> bytes:
    """A column of wire type ``t`` holding each run's value ``count`` times: the value is
    encoded once per run. A String or fixed-width value is its encoding repeated; a map
    repeats its keys and values, with offsets growing row by row."""
    if t.startswith("Map("):
        key_t, value_t = _split_args(t[4:-1])
        keys_w, values_w = _cached_writer(key_t), _cached_writer(value_t)
        offsets = array("Q", accumulate(chain.from_iterable(repeat(len(m), n) for m, n in runs)))
        keys = b"".join(keys_w(list(m)) * n for m, n in runs)
        values = b"".join(values_w(list(m.values())) * n for m, n in runs)
        return _fixed_bytes("Q", offsets) + keys + values
    if t in _FIXED or t == "String" or t.startswith("DateTime64("):
        writer = _cached_writer(t)
        return b"".join(writer([value]) * n for value, n in runs)
    raise NativeTypeError(f"no Native writer for runs of type {t!r}")


def encode_block(columns: Mapping[str, Column], types: Mapping[str, str]) -> bytes:
    """One Native block of ``columns`` (name → values, all the same length), each sent
    as :func:`wire_type` of its ``types`` entry (the table's column type)."""
    names = list(columns)
    rows = len(columns[names[0]]) if names else 0
    parts = [_varint(len(names)), _varint(rows)]
    for name in names:
        t = wire_type(types[name])
        values = columns[name]
        if len(values) != rows:
            raise ValueError(f"column {name!r} has {len(values)} values, {rows} expected")
        for text in (name, t):
            raw = text.encode()
            parts.append(_varint(len(raw)) + raw)
        if isinstance(values, Encoded):
            if values.wire_type != t:
                raise NativeTypeError(
                    f"column {name!r} is encoded as {values.wire_type}, the table has {t}"
                )
            parts.append(values.data)
        elif isinstance(values, Repeated):
            parts.append(_repeated_bytes(t, values.runs))
        else:
            parts.append(_cached_writer(t)(values))
    return b"".join(parts)
