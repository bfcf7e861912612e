"""One percentile definition everywhere a person reads a percentile: the demo's tables,
the built-in page, the Grafana dashboard and the SQL the README and docs show all use
ClickHouse's ``quantileExactInclusive`` family, exact and interpolated linearly between
the two nearest ranks, which is ``numpy.percentile``'s default and so what vLLM's
``bench serve`` reports. Otherwise one run shows three p99s.

The one exception is named where it is used: the dashboard's ITL-over-time panel reads
the per-minute DDSketch (``quantilesDDMerge`` over ``itl_by_minute``), so a surface that
uses it must say "DDSketch"; its values lie within 1% of the exact
percentile's neighbouring ranks (tested below)."""

from __future__ import annotations

import re
from pathlib import Path

import chdb
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SURFACES = [
    ROOT / "serving" / "demo.py",
    ROOT / "collector" / "query" / "ui_assets" / "app.js",
    *sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json")),
    ROOT / "README.md",
    *sorted(
        p for p in (ROOT / "docs").glob("*.md") if p.name != "benchmarks.md"
    ),  # benchmarks.md names the functions it timed
]
ALLOWED = {"quantileExactInclusive", "quantilesExactInclusive", "quantileExactInclusiveIf"}
SKETCH = {"quantilesDDMerge"}  # itl_by_minute's states, within 1% of exact
CALL = re.compile(r"\b(quantiles?[A-Za-z]*)\s*\(")


@pytest.mark.parametrize("path", SURFACES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_report_surface_uses_the_one_percentile(path: Path) -> None:
    text = path.read_text()
    used = set(CALL.findall(text))
    assert used or path.suffix == ".md", f"no percentile found in {path}: is CALL stale?"
    if used & SKETCH:
        assert "DDSketch" in text, f"{path.relative_to(ROOT)} reads the sketch unnamed"
    assert used <= ALLOWED | SKETCH, f"{path.relative_to(ROOT)} uses {sorted(used - ALLOWED)}"


def test_the_one_percentile_is_numpys() -> None:
    rng = np.random.default_rng(7)
    values = rng.lognormal(-4, 1, 997)  # latencies in seconds, an odd count
    literal = ",".join(repr(float(v)) for v in values)
    sql = (
        "SELECT quantilesExactInclusive(0.5, 0.9, 0.99)(v) "
        f"FROM (SELECT arrayJoin([{literal}]) AS v)"
    )
    got = [float(x) for x in chdb.query(sql, "CSV").data().strip().strip('"[]').split(",")]
    assert got == pytest.approx(list(np.percentile(values, [50, 90, 99])), rel=1e-12)


def test_the_sketch_is_within_one_percent_of_the_exact_ranks() -> None:
    """What itl_by_minute stores and the dashboard merges, against numpy: each sketch
    percentile lies within 1% of the two samples the exact one interpolates between."""
    rng = np.random.default_rng(11)
    values = rng.lognormal(-4, 1, 5000)
    literal = ",".join(repr(float(v)) for v in values)
    levels = (0.5, 0.9, 0.99)
    sql = (
        f"SELECT quantilesDDMerge(0.001, {', '.join(map(str, levels))})(s) FROM ("
        "SELECT quantilesDDState(0.001, 0.5)(v) AS s "
        f"FROM (SELECT arrayJoin([{literal}]) AS v, rowNumberInAllBlocks() % 60 AS minute) "
        "GROUP BY minute)"
    )
    got = [float(x) for x in chdb.query(sql, "CSV").data().strip().strip('"[]').split(",")]
    for q, value in zip(levels, got, strict=True):
        low = float(np.percentile(values, 100 * q, method="lower"))
        high = float(np.percentile(values, 100 * q, method="higher"))
        assert low * 0.99 <= value <= high * 1.01, (q, low, value, high)
