"""The named report queries: the Grafana dashboard holds exactly them, each one runs on
a real chDB store through the query guard, and cells are formatted as the tables show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokentrace.collector.query.reports import (
    GRAFANA_DESCRIPTION,
    GRAFANA_WINDOW,
    REPORTS,
    WINDOW,
    Column,
    format_cell,
    grafana_panels,
    report,
    window_params,
)
from tokentrace.collector.query.sqlguard import guarded_query
from tokentrace.collector.store import open_store

ROOT = Path(__file__).resolve().parents[4]
DASHBOARD = ROOT / "deploy/grafana/dashboards/tokentrace.json"


def test_the_dashboard_holds_exactly_the_reports() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ours = [p for p in panels if str(p.get("description", "")).startswith(GRAFANA_DESCRIPTION)]
    assert ours, "the dashboard has no report panels"
    expected = grafana_panels(ours[0]["id"], ours[0]["gridPos"]["y"])
    assert ours == expected, (
        "deploy/grafana's report panels are out of date: run "
        "python -m tokentrace.collector.query.reports deploy/grafana/dashboards/tokentrace.json"
    )
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))


def test_every_report_runs_through_the_guard_on_a_real_store(tmp_path: Path) -> None:
    store = open_store(f"chdb://{tmp_path / 'ch'}")
    try:
        for rep in REPORTS:
            result = guarded_query(store, rep.sql_for(), window_params(0, 1))
            assert result.rows == [], rep.name  # columns: the integration tests read them
    finally:
        store.close()


def test_the_window_is_the_only_difference_between_surfaces() -> None:
    for rep in REPORTS:
        ours, grafana = rep.sql_for(), rep.sql_for(GRAFANA_WINDOW)
        assert ours.replace(WINDOW, GRAFANA_WINDOW) == grafana
        assert "quantilesExactInclusive(0.5, 0.9, 0.99)" in ours


def test_names_and_windows_are_checked() -> None:
    assert report("itl_by_decode").name == "itl_by_decode"
    with pytest.raises(KeyError, match="no report 'x'; the reports are ttft_by_router"):
        report("x")
    with pytest.raises(ValueError, match="end after it starts"):
        window_params(10, 10)


@pytest.mark.parametrize(
    ("unit", "value", "text"),
    [
        ("ms", 0.0123456, "12.35"),
        ("signed_ms", -0.002, "-2.00"),
        ("signed_ms", 0.002, "+2.00"),
        ("kib", 4096, "4"),
        ("mb_s", 2_500_000.0, "2.5"),
        ("float", 3.14159, "3.14"),
        ("count", 7, "7"),
        ("ms", None, "—"),
        ("ms", float("nan"), "—"),
    ],
)
def test_cells_read_as_the_tables_show_them(unit: str, value: object, text: str) -> None:
    assert format_cell(Column("h", "k", unit), value) == text
