"""Smoke test of ``bench.agreement`` on a short run: it starts the stack, drives vLLM's
client, compares and yields well-formed figures. The agreement targets themselves are
the benchmark's to report (docs/benchmarks.md), not asserted here."""

from __future__ import annotations

import math

from bench import agreement


def test_agreement_runs_and_reports_its_figures() -> None:
    args = agreement.build_parser().parse_args(
        ["--concurrencies", "1", "--endpoints", "chat", "--requests", "3"]
        + ["--input-len", "16", "--output-len", "4"]
    )
    figures = agreement.run(args)
    assert [f.name for f in figures] == [
        "chat c=1: count mismatches (gaps, tokens)",
        "chat c=1: median |client - stored| TTFT",
        "chat c=1: p99 |client - stored| TTFT",
        "chat c=1: median |client - stored| ITL",
        "chat c=1: p99 |client - stored| ITL",
    ]
    assert figures[0].value == 0 and figures[0].baseline == 3
    for f in figures[1:]:
        assert math.isfinite(f.value) and f.value >= 0, f
        assert f.baseline is not None and math.isfinite(f.baseline) and f.baseline > 0, f
