"""Smoke test of ``bench.query`` on a small store: it loads, starts a collector, runs
every query and yields well-formed figures. Latency targets are not asserted."""

from __future__ import annotations

import math

from bench import query


def test_query_runs_and_reports_its_figures() -> None:
    args = query.build_parser().parse_args(
        ["--token-rows", "20000", "--spans", "5000", "--repeats", "1"]
    )
    figures = query.run(args)
    assert len(figures) == 5
    for f in figures[:3]:
        assert math.isfinite(f.value) and f.value > 0, f
    # The loaded sizes are exact: the queries ran over what was asked for.
    assert figures[3].met and figures[4].met
