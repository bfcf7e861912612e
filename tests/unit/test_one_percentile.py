"""One percentile definition everywhere a person reads a percentile: the demo's tables,
the built-in page, the Grafana dashboard and the SQL the README and docs show all use
ClickHouse's ``quantileExactInclusive`` family, exact and interpolated linearly between
the two nearest ranks, which is ``numpy.percentile``'s default and so what vLLM's
``bench serve`` reports. Otherwise one run shows three p99s."""

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
CALL = re.compile(r"\b(quantiles?[A-Za-z]*)\s*\(")


@pytest.mark.parametrize("path", SURFACES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_report_surface_uses_the_one_percentile(path: Path) -> None:
    used = set(CALL.findall(path.read_text()))
    assert used or path.suffix == ".md", f"no percentile found in {path}: is CALL stale?"
    assert used <= ALLOWED, f"{path.relative_to(ROOT)} uses {sorted(used - ALLOWED)}"


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
