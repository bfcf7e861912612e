"""Smoke test of ``bench.hotpath``: it runs end to end at the smallest settings and
yields well-formed figures. Timing targets are not asserted: this machine is noisy."""

from __future__ import annotations

import math

from bench import hotpath


def test_hotpath_runs_and_reports_its_figures() -> None:
    args = hotpath.build_parser().parse_args(
        ["--requests", "2", "--tokens", "32", "--repeats", "1", "--warmup", "0"]
    )
    figures = hotpath.run(args)
    assert [f.name for f in figures] == [
        "tokentrace ns/token",
        "SDK span / tokentrace",
        "no tracing ns/token",
    ]
    for f in figures:
        assert math.isfinite(f.value) and f.value > 0, f
        assert f.baseline is None or (math.isfinite(f.baseline) and f.baseline > 0), f
