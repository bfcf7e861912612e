"""Smoke test of ``bench.ingest``: a real collector and the parse-only receiver fed by
the sender process in both wire modes, at the smallest settings. Throughput targets are
not asserted: a run this short cannot judge them."""

from __future__ import annotations

import math

from bench import ingest


def test_ingest_runs_and_reports_its_figures() -> None:
    args = ingest.build_parser().parse_args(
        ["--seconds", "1", "--warmup", "0.5", "--inflight", "2", "--tokens", "16"]
    )
    figures = ingest.run(args)
    names = [f.name for f in figures]
    assert "ingest (one span per token): spans stored / collector CPU-s" in names
    assert "ingest (packed): token rows stored / collector CPU-s" in names
    assert "ingest (packed): the store's own insert rate, same rows" in names
    for f in figures:
        assert math.isfinite(f.value) and f.value > 0, f
        assert f.baseline is None or (math.isfinite(f.baseline) and f.baseline > 0), f


def test_the_template_export_holds_what_it_says() -> None:
    from tokentrace.collector.ingest.decode import decode_request
    from tokentrace.collector.ingest.otlp_parse import parse_protobuf

    for packed in (False, True):
        template = ingest.build_template(3, 16, packed)
        batch = decode_request(parse_protobuf(template.data))
        assert batch.rejected_spans == 0
        assert len(batch) + batch.packed_tokens == template.spans == 3 * (4 + 16)
        assert template.token_rows == 3 * 16
