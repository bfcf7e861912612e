"""Smoke test of ``bench.export``: child processes, sink and all three modes run at the
smallest settings and yield well-formed figures. Timing targets are not asserted."""

from __future__ import annotations

import math

from bench import export


def test_export_runs_and_reports_its_figures() -> None:
    args = export.build_parser().parse_args(
        ["--requests", "4", "--tokens", "16", "--repeats", "1", "--timeout", "120"]
    )
    figures = export.run(args)
    assert [f.name for f in figures] == [
        "packed µs/token",
        "spans µs/token",
        "tracing off µs/token",
        "packed wire bytes/token",
    ]
    for f in figures:
        assert math.isfinite(f.value) and f.value > 0, f
        assert f.baseline is None or (math.isfinite(f.baseline) and f.baseline > 0), f
