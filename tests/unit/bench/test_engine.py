"""Smoke test of ``bench.engine``: the reference engine decodes with tracing off and
on (exporting to a sink process) at tiny settings and yields well-formed figures.
Throughput targets are not asserted: a smoke run is far too short to judge them."""

from __future__ import annotations

import math

from bench import engine


def test_engine_runs_and_reports_its_figures() -> None:
    args = engine.build_parser().parse_args(["--quick", "--spans"])
    figures = engine.run(args)
    assert [f.name for f in figures] == [
        "batch 1 tracing on",
        "batch 1 engine busy",
        "batch 1 off-engine CPU",
        "batch 1 spans mode",
        "batch 8 tracing on",
        "batch 8 engine busy",
        "batch 8 off-engine CPU",
        "batch 8 spans mode",
    ]
    for f in figures:
        assert f.baseline is not None and math.isfinite(f.baseline), f
        assert math.isfinite(f.value), f
        if f.unit == "tok/s":
            assert f.value > 0 and f.baseline > 0, f
        else:  # CPU share: tracing off may add none at all
            assert f.value > 0 and f.baseline >= 0, f
