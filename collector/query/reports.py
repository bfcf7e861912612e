"""The report queries: one named set, read by every surface that shows per-node numbers.

``tokentrace demo`` prints them, ``tokentrace report`` prints them (or their rows as
JSON), the collector serves them as ``GET /reports`` and ``GET /reports/{name}`` (which
the built-in page draws as tables), and the Grafana dashboard holds one table panel per
report whose SQL is :meth:`Report.sql_for` with Grafana's time filter
(checked by a test, written by ``python -m tokentrace.collector.query.reports``). For one store
and one window they all show the same numbers: one SQL text, one percentile definition
(:data:`PERCENTILES`: exact, linearly interpolated between the nearest ranks, as
``numpy.percentile`` and so vLLM's ``bench serve``).

Every report takes its time window as the ClickHouse query parameters ``from_ms`` and
``to_ms`` (milliseconds since the epoch; rows with ``from_ms <= ts < to_ms``), and
returns one row per node (or node pair), latencies in seconds.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "GRAFANA_WINDOW",
    "PERCENTILES",
    "REPORTS",
    "WINDOW",
    "Column",
    "Report",
    "format_cell",
    "grafana_panels",
    "report",
    "report_table",
    "window_params",
]

#: The one percentile definition: p50, p90, p99 in one pass over the rows.
PERCENTILES = "quantilesExactInclusive(0.5, 0.9, 0.99)"
#: The window every report reads, as ClickHouse query parameters.
WINDOW = (
    "ts >= fromUnixTimestamp64Milli({from_ms:Int64}) "
    "AND ts < fromUnixTimestamp64Milli({to_ms:Int64})"
)
#: The same window in the Grafana ClickHouse plugin's macro (the dashboard's range).
GRAFANA_WINDOW = "$__timeFilter_ms(ts)"


@dataclass(frozen=True)
class Column:
    """One column of a report: its header, the result column, and how a person reads it:
    ``text``, ``count``, ``ms`` (seconds shown as milliseconds), ``signed_ms``, ``kib``
    (bytes shown as KiB) or ``mb_s`` (bytes per second shown as MB/s)."""

    header: str
    key: str
    unit: str = "text"


@dataclass(frozen=True)
class Report:
    """A named query. ``sql`` holds ``{window}`` where the time condition goes and
    ``{p}`` for :data:`PERCENTILES`."""

    name: str
    title: str
    sql: str
    columns: tuple[Column, ...]

    def sql_for(self, window: str = WINDOW) -> str:
        """The statement with ``window`` as its time condition."""
        return self.sql.format(window=window, p=PERCENTILES).strip()

    def describe(self) -> dict[str, Any]:
        """The report without its SQL, as ``GET /reports`` lists it."""
        return {
            "name": self.name,
            "title": self.title,
            "columns": [{"header": c.header, "key": c.key, "unit": c.unit} for c in self.columns],
        }


def _q3(prefix: str) -> str:
    return f"q[1] AS {prefix}p50_s, q[2] AS {prefix}p90_s, q[3] AS {prefix}p99_s"


REPORTS: tuple[Report, ...] = (
    Report(
        "ttft_by_router",
        "TTFT per router node (client-visible: first content chunk written − arrival)",
        f"""
SELECT node, requests, {_q3("ttft_")}, mean_e2e_s
FROM (
    SELECT router_node AS node, count() AS requests, {{p}}(ttft_s) AS q,
        avg(e2e_s) AS mean_e2e_s
    FROM tokentrace.requests
    WHERE {{window}} AND router_node IS NOT NULL
    GROUP BY node
)
ORDER BY node""",
        (
            Column("node", "node"),
            Column("requests", "requests", "count"),
            Column("p50 ms", "ttft_p50_s", "ms"),
            Column("p90 ms", "ttft_p90_s", "ms"),
            Column("p99 ms", "ttft_p99_s", "ms"),
            Column("mean e2e ms", "mean_e2e_s", "ms"),
        ),
    ),
    Report(
        "prefill_by_node",
        "Prefill time per prefill node (arrival → KV ready)",
        f"""
SELECT node, requests, {_q3("prefill_")}
FROM (
    SELECT prefill_node AS node, count() AS requests, {{p}}(prefill_s) AS q
    FROM tokentrace.requests
    WHERE {{window}} AND prefill_node IS NOT NULL
    GROUP BY node
)
ORDER BY node""",
        (
            Column("node", "node"),
            Column("requests", "requests", "count"),
            Column("p50 ms", "prefill_p50_s", "ms"),
            Column("p90 ms", "prefill_p90_s", "ms"),
            Column("p99 ms", "prefill_p99_s", "ms"),
        ),
    ),
    Report(
        "kv_by_pair",
        "KV transfer per source → destination (NIXL, initiator clock)",
        f"""
SELECT src_node, dst_node, transfers, avg_bytes, {_q3("")}, bytes_per_s
FROM (
    SELECT src_node, dst_node, count() AS transfers, avg(bytes) AS avg_bytes,
        {{p}}(duration_s) AS q, sum(bytes) / sum(duration_s) AS bytes_per_s
    FROM tokentrace.kv_transfers
    WHERE {{window}}
    GROUP BY src_node, dst_node
)
ORDER BY src_node, dst_node""",
        (
            Column("source", "src_node"),
            Column("destination", "dst_node"),
            Column("transfers", "transfers", "count"),
            Column("avg KiB", "avg_bytes", "kib"),
            Column("p50 ms", "p50_s", "ms"),
            Column("p99 ms", "p99_s", "ms"),
            Column("MB/s", "bytes_per_s", "mb_s"),
        ),
    ),
    Report(
        "handoff_by_pair",
        "Prefill done → decode receives it (p50/p99) and → first KV read (p50), on the "
        "router's clock; skew = decode clock − prefill clock, measured and removed",
        f"""
SELECT prefill_node, decode_node, requests, {_q3("")}, h[1] AS kv_read_p50_s, skew_s
FROM (
    SELECT prefill_node, decode_node, count() AS requests, {{p}}(prefill_to_decode_s) AS q,
        {{p}}(kv_handoff_s) AS h,
        avg(decode_clock_offset_s - prefill_clock_offset_s) AS skew_s
    FROM tokentrace.requests
    WHERE {{window}} AND prefill_to_decode_s IS NOT NULL AND prefill_node != decode_node
    GROUP BY prefill_node, decode_node
)
ORDER BY prefill_node, decode_node""",
        (
            Column("prefill", "prefill_node"),
            Column("decode", "decode_node"),
            Column("requests", "requests", "count"),
            Column("p50 ms", "p50_s", "ms"),
            Column("p99 ms", "p99_s", "ms"),
            Column("KV read p50 ms", "kv_read_p50_s", "ms"),
            Column("skew ms", "skew_s", "signed_ms"),
        ),
    ),
    Report(
        "itl_by_decode",
        "Inter-token latency per decode node (gap between emissions)",
        f"""
SELECT node, gaps, {_q3("itl_")}, mean_batch
FROM (
    SELECT node, count() AS gaps, {{p}}(itl_s) AS q, avg(batch_size) AS mean_batch
    FROM tokentrace.token_latencies
    WHERE {{window}} AND itl_s IS NOT NULL
    GROUP BY node
)
ORDER BY node""",
        (
            Column("node", "node"),
            Column("gaps", "gaps", "count"),
            Column("p50 ms", "itl_p50_s", "ms"),
            Column("p90 ms", "itl_p90_s", "ms"),
            Column("p99 ms", "itl_p99_s", "ms"),
            Column("mean batch", "mean_batch", "float"),
        ),
    ),
)

_BY_NAME = {r.name: r for r in REPORTS}


def report(name: str) -> Report:
    """The report called ``name``; KeyError naming the ones there are."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no report {name!r}; the reports are {', '.join(_BY_NAME)}") from None


def window_params(from_ms: int, to_ms: int) -> dict[str, int]:
    """The query parameters of the window ``from_ms <= ts < to_ms``."""
    if to_ms <= from_ms:
        raise ValueError(f"the window must end after it starts, got {from_ms}..{to_ms} ms")
    return {"from_ms": int(from_ms), "to_ms": int(to_ms)}


def format_cell(column: Column, value: Any) -> str:
    """A value as the demo's and ``tokentrace report``'s tables show it (the built-in
    page's ``app.js`` formats the same units the same way)."""
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if column.unit == "ms":
        return f"{value * 1000:.2f}"
    if column.unit == "signed_ms":
        return f"{value * 1000:+.2f}"
    if column.unit == "kib":
        return f"{value / 1024:.0f}"
    if column.unit == "mb_s":
        return f"{value / 1e6:.1f}"
    if column.unit == "float":
        return f"{value:.2f}"
    return str(value)


_LEFT = {"text"}


def report_table(rep: Report, rows: list[dict[str, Any]]) -> Table:
    """``rows`` of ``rep`` as a rich table (a row of dashes when there are none)."""
    from rich.table import Table

    table = Table(title=rep.title, title_justify="left")
    for column in rep.columns:
        table.add_column(column.header, justify="left" if column.unit in _LEFT else "right")
    for row in rows:
        table.add_row(*[format_cell(c, row.get(c.key)) for c in rep.columns])
    if not rows:
        table.add_row(*(["—"] * len(rep.columns)))
    return table


# -- the Grafana dashboard's "Reports" row ---------------------------------------------

#: How a report's panel is recognised: its description is this and the report's name.
GRAFANA_DESCRIPTION = "tokentrace report "
_DATASOURCE_UID = "tokentrace-clickhouse"  # deploy/grafana/provisioning's data source
_GRAFANA_UNITS = {"ms": "s", "signed_ms": "s", "kib": "bytes", "mb_s": "Bps"}


def grafana_panels(first_id: int, y: int) -> list[dict[str, Any]]:
    """The dashboard's reports: one ClickHouse table panel per report (its description
    ``tokentrace report NAME``), from panel id ``first_id`` and grid row ``y`` on."""
    panels: list[dict[str, Any]] = []
    for k, rep in enumerate(REPORTS):
        overrides = [
            {
                "matcher": {"id": "byName", "options": c.key},
                "properties": [
                    {"id": "displayName", "value": c.header.replace(" ms", "")},
                    *(
                        [{"id": "unit", "value": _GRAFANA_UNITS[c.unit]}]
                        if c.unit in _GRAFANA_UNITS
                        else []
                    ),
                ],
            }
            for c in rep.columns
        ]
        panels.append(
            {
                "type": "table",
                "title": rep.title,
                "description": f"{GRAFANA_DESCRIPTION}{rep.name}",
                "id": first_id + k,
                "datasource": {"type": "grafana-clickhouse-datasource", "uid": _DATASOURCE_UID},
                "gridPos": {"h": 6, "w": 12, "x": 12 * (k % 2), "y": y + 6 * (k // 2)},
                "fieldConfig": {"defaults": {}, "overrides": overrides},
                "options": {"showHeader": True},
                "targets": [
                    {
                        "refId": "A",
                        "datasource": {
                            "type": "grafana-clickhouse-datasource",
                            "uid": _DATASOURCE_UID,
                        },
                        "editorType": "sql",
                        "format": 1,
                        "queryType": "table",
                        "rawSql": rep.sql_for(GRAFANA_WINDOW),
                    }
                ],
            }
        )
    return panels


def _write_dashboard(path: Path) -> None:
    """Replace the dashboard's report panels (or append them) with :func:`grafana_panels`."""
    dashboard = json.loads(path.read_text())
    kept = [
        p
        for p in dashboard["panels"]
        if not str(p.get("description", "")).startswith(GRAFANA_DESCRIPTION)
    ]
    bottom = max((p["gridPos"]["y"] + p["gridPos"]["h"] for p in kept), default=0)
    first_id = max((int(p.get("id", 0)) for p in kept), default=0) + 1
    dashboard["panels"] = kept + grafana_panels(first_id, bottom)
    path.write_text(json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":  # python -m tokentrace.collector.query.reports DASHBOARD.json
    _write_dashboard(Path(sys.argv[1]))
