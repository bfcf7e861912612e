"""Smoke test of ``bench.store_cost``: both variants in their own processes, at the
smallest settings, report every figure. What they measure is not asserted: a run this
short cannot judge it."""

from __future__ import annotations

import math

from bench import store_cost


def test_store_cost_runs_both_variants_and_reports_its_figures() -> None:
    for mode in ("spans", "packed"):
        args = store_cost.build_parser().parse_args(
            ["--mode", mode, "--exports", "2", "--blocks", "2", "--seconds", "0.5"]
        )
        figures = store_cost.run(args)
        assert len(figures) == 5
        for f in figures:
            assert f.baseline_name == "ClickHouse's merge defaults"
            assert f.baseline is not None and math.isfinite(f.value), f
        insert, rewrite = figures[0], figures[1]
        assert insert.value > 0 and rewrite.value > 0, figures
