"""Smoke test of ``bench.query`` on a small store: it loads, starts a collector, runs
every query and yields well-formed figures. Latency targets are not asserted."""

from __future__ import annotations

import math

from bench import query


def test_query_runs_and_reports_its_figures() -> None:
    args = query.build_parser().parse_args(["--token-rows", "20480", "--repeats", "1"])
    figures = query.run(args)
    assert len(figures) == 7
    for f in figures[:4]:
        assert math.isfinite(f.value) and f.value > 0, f
    # The loaded sizes are exact: the queries ran over what was asked for.
    assert figures[4].met and figures[5].met
    assert math.isfinite(figures[6].value) and figures[6].value > 0
