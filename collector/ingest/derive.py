"""Span batch → rows for ``request_parts``, ``kv_transfers`` and ``node_clocks``.

``token_latencies`` rows are not made here: ClickHouse derives them from the stored
``llm.token`` spans, one SQL definition for tokens sent one span each and tokens
expanded from a packed decode span (``token_latencies_mv`` in :mod:`tokentrace.schemas.ddl`).

Pure and column-wise. Each span contributes at most one partial row per table; the
``requests`` view folds a request's parts together, so arrival order does not matter.
Attribute values that are missing, unparsable or out of the column's range become NULL
(or the column's default), never an error: a row that ClickHouse would refuse would
otherwise fail a whole group commit again and again.

Timestamps that cross nodes (the router's dispatch times, a prefill's start and end, a
decode's start, its first KV read) are stored as each node's clock gave them, next to
the router's clock offset estimates; the ``requests`` view subtracts them on one clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokentrace.schemas import attributes as attrs
from tokentrace.schemas.attributes import node_of

from .decode import SpanBatch

__all__ = [
    "DerivedRows",
    "KV_TRANSFERS_COLUMNS",
    "NODE_CLOCKS_COLUMNS",
    "REQUEST_PARTS_COLUMNS",
    "derive_rows",
]

REQUEST_PARTS_COLUMNS = (
    "trace_id",
    "ts",
    "request_id",
    "model",
    "router_node",
    "prefill_node",
    "decode_node",
    "input_tokens",
    "output_tokens",
    "ttft_s",
    "e2e_s",
    "tpot_s",
    "prefill_s",
    "kv_transfer_s",
    "kv_bytes",
    "status",
    "prefill_sent",
    "decode_sent",
    "prefill_start",
    "prefill_end",
    "decode_start",
    "kv_start",
    "prefill_clock_offset_s",
    "decode_clock_offset_s",
)
KV_TRANSFERS_COLUMNS = (
    "ts",
    "trace_id",
    "src_node",
    "dst_node",
    "duration_s",
    "bytes",
    "blocks",
    "backend",
    "status",
)
NODE_CLOCKS_COLUMNS = ("ts", "node", "offset_s", "error_s", "reference_node")

_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1
_INT64_MAX = 2**63 - 1


def _columns(names: tuple[str, ...]) -> dict[str, list[Any]]:
    return {name: [] for name in names}


@dataclass
class DerivedRows:
    """Insert columns per derived table (timestamps as integer ns since the epoch)."""

    request_parts: dict[str, list[Any]] = field(
        default_factory=lambda: _columns(REQUEST_PARTS_COLUMNS)
    )
    kv_transfers: dict[str, list[Any]] = field(
        default_factory=lambda: _columns(KV_TRANSFERS_COLUMNS)
    )
    node_clocks: dict[str, list[Any]] = field(default_factory=lambda: _columns(NODE_CLOCKS_COLUMNS))

    def _all(self) -> dict[str, dict[str, list[Any]]]:
        return {
            "request_parts": self.request_parts,
            "kv_transfers": self.kv_transfers,
            "node_clocks": self.node_clocks,
        }

    def tables(self) -> dict[str, dict[str, list[Any]]]:
        """Table name → columns, for every table with at least one row."""
        return {name: cols for name, cols in self._all().items() if cols["ts"]}

    def extend(self, other: DerivedRows) -> None:
        theirs = other._all()
        for table, mine in self._all().items():
            for name, values in theirs[table].items():
                mine[name].extend(values)


def _uint(value: str | None, max_value: int) -> int | None:
    """A non-negative integer attribute (sent as int, or as a float/str of one)."""
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        try:
            as_float = float(value)
        except ValueError:
            return None
        if not as_float.is_integer():
            return None
        number = int(as_float)
    return number if 0 <= number <= max_value else None


def _float(value: str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number == number and abs(number) != float("inf") else None


def _str(value: str | None) -> str | None:
    return value if value else None


def _status(status_code: str) -> str:
    return "error" if status_code == "Error" else "ok"


def _add_request_part(rows: DerivedRows, trace_id: str, **values: Any) -> None:
    for name, column in rows.request_parts.items():
        column.append(trace_id if name == "trace_id" else values.get(name))


def derive_rows(batch: SpanBatch) -> DerivedRows:
    """Rows derived from the ``llm.*`` spans of ``batch``; other spans add nothing.

    Durations are seconds (end − start) / 1e9 on the emitting node's clock.
    """
    rows = DerivedRows()
    clocks: set[tuple[str, float, float, str]] = set()
    for i, name in enumerate(batch.name):
        if name == attrs.SPAN_REQUEST:
            _derive_request(rows, batch, i, clocks)
        elif name == attrs.SPAN_PREFILL:
            _add_request_part(
                rows,
                batch.trace_id[i],
                prefill_node=node_of(batch.resource_attributes[i]) or None,
                prefill_s=_duration_s(batch, i),
                prefill_start=batch.start_ns[i],
                prefill_end=batch.end_ns[i],
            )
        elif name == attrs.SPAN_DECODE:
            _add_request_part(
                rows,
                batch.trace_id[i],
                decode_node=node_of(batch.resource_attributes[i]) or None,
                decode_start=batch.start_ns[i],
            )
        elif name == attrs.SPAN_KV_TRANSFER:
            _derive_kv_transfer(rows, batch, i)
    return rows


def _duration_s(batch: SpanBatch, i: int) -> float:
    return (batch.end_ns[i] - batch.start_ns[i]) / 1e9


def _derive_request(
    rows: DerivedRows, batch: SpanBatch, i: int, clocks: set[tuple[str, float, float, str]]
) -> None:
    a = batch.attributes[i]
    router_node = node_of(batch.resource_attributes[i])
    prefill_node = _str(a.get(attrs.PREFILL_NODE))
    decode_node = _str(a.get(attrs.DECODE_NODE))
    prefill_offset = _float(a.get(attrs.PREFILL_CLOCK_OFFSET_S))
    decode_offset = _float(a.get(attrs.DECODE_CLOCK_OFFSET_S))
    for node, offset, error in (
        (prefill_node, prefill_offset, _float(a.get(attrs.PREFILL_CLOCK_ERROR_S))),
        (decode_node, decode_offset, _float(a.get(attrs.DECODE_CLOCK_ERROR_S))),
    ):
        # One row per distinct estimate per batch: consecutive requests mostly repeat it.
        key = (node or "", offset or 0.0, error or 0.0, router_node)
        if node and offset is not None and key not in clocks:
            clocks.add(key)
            c = rows.node_clocks
            c["ts"].append(batch.start_ns[i])
            c["node"].append(node)
            c["offset_s"].append(offset)
            c["error_s"].append(error if error is not None else 0.0)
            c["reference_node"].append(router_node)
    e2e_s = _float(a.get(attrs.E2E_S))
    if e2e_s is None:  # a router before 0.x, or an error: the span's own duration
        e2e_s = _duration_s(batch, i)
    ttft_s = _float(a.get(attrs.GEN_AI_SERVER_TTFT))
    output_tokens = _uint(a.get(attrs.GEN_AI_USAGE_OUTPUT_TOKENS), _UINT32_MAX)
    tpot_s = None
    # TPOT is undefined for a single output token: there is no second token to time.
    if ttft_s is not None and output_tokens is not None and output_tokens > 1:
        tpot_s = (e2e_s - ttft_s) / (output_tokens - 1)
    _add_request_part(
        rows,
        batch.trace_id[i],
        ts=batch.start_ns[i],
        request_id=_str(a.get(attrs.REQUEST_ID)),
        model=_str(a.get(attrs.GEN_AI_REQUEST_MODEL)),
        router_node=router_node or None,
        prefill_node=prefill_node,
        decode_node=decode_node,
        input_tokens=_uint(a.get(attrs.GEN_AI_USAGE_INPUT_TOKENS), _UINT32_MAX),
        output_tokens=output_tokens,
        ttft_s=ttft_s,
        e2e_s=e2e_s,
        tpot_s=tpot_s,
        status=_status(batch.status_code[i]),
        prefill_sent=_uint(a.get(attrs.PREFILL_SENT_NS), _INT64_MAX),
        decode_sent=_uint(a.get(attrs.DECODE_SENT_NS), _INT64_MAX),
        prefill_clock_offset_s=prefill_offset,
        decode_clock_offset_s=decode_offset,
    )


def _derive_kv_transfer(rows: DerivedRows, batch: SpanBatch, i: int) -> None:
    a = batch.attributes[i]
    duration_s = _duration_s(batch, i)
    kv_bytes = _uint(a.get(attrs.KV_BYTES), _UINT64_MAX)
    _add_request_part(
        rows,
        batch.trace_id[i],
        kv_transfer_s=duration_s,
        kv_bytes=kv_bytes,
        kv_start=batch.start_ns[i],
    )
    kv = rows.kv_transfers
    kv["ts"].append(batch.start_ns[i])
    kv["trace_id"].append(batch.trace_id[i])
    kv["src_node"].append(a.get(attrs.KV_SRC_NODE, ""))
    kv["dst_node"].append(a.get(attrs.KV_DST_NODE, ""))
    kv["duration_s"].append(duration_s)
    kv["bytes"].append(kv_bytes or 0)
    kv["blocks"].append(_uint(a.get(attrs.KV_BLOCKS), _UINT32_MAX) or 0)
    kv["backend"].append(a.get(attrs.KV_BACKEND, ""))
    kv["status"].append(_status(batch.status_code[i]))
