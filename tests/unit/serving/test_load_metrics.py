"""The load generator's per-request and summary metrics on hand-made chunk timelines."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tokentrace.serving.load import (
    MetricStats,
    RequestRecord,
    StreamTimeline,
    make_prompt,
    summarize,
    tpot_s,
)


def _record(
    index: int, start: float, chunks: list[tuple[float, str]], tokens: int
) -> RequestRecord:
    timeline = StreamTimeline(start)
    for t, text in chunks:
        timeline.add_chunk(t, text)
    record = RequestRecord(index=index, output_tokens=tokens)
    record.fill_from(timeline, end_s=chunks[-1][0] + 0.01)
    return record


def test_every_chunk_with_choices_is_an_emission_as_vllms_client_counts_it() -> None:
    """vLLM's bench serve request functions: the first chunk with choices is TTFT (for
    chat the role chunk), each later one adds a gap, empty text or not."""
    timeline = StreamTimeline(start_s=10.0)
    timeline.add_chunk(10.25, "")  # the chat role chunk
    timeline.add_chunk(10.5, "a")
    timeline.add_chunk(10.75, "b")
    timeline.add_chunk(11.5, "")  # the finishing step (EOS): empty text, finish_reason
    assert timeline.ttft_s == pytest.approx(0.25)
    assert timeline.itl_s == pytest.approx([0.25, 0.25, 0.75])
    assert timeline.text == "ab"
    # E2E is vLLM's latency: up to the last chunk with choices, not the end of the stream.
    assert timeline.e2e_s(end_s=99.0) == pytest.approx(1.5)


def test_no_chunks_means_no_ttft_and_e2e_to_end() -> None:
    timeline = StreamTimeline(start_s=1.0)
    assert timeline.ttft_s is None
    assert timeline.itl_s == []
    assert timeline.e2e_s(end_s=3.0) == pytest.approx(2.0)


def test_single_token_output_has_no_tpot_and_no_itl() -> None:
    record = _record(0, 0.0, [(0.2, "z")], tokens=1)
    assert record.ttft_s == pytest.approx(0.2)
    assert record.itl_s == []
    assert record.tpot_s is None
    assert record.chunk_times_s == pytest.approx([0.2])


def test_tpot_is_decode_time_over_tokens_after_the_first() -> None:
    record = _record(0, 0.0, [(0.1, "a"), (0.3, "b"), (0.5, "c"), (0.7, "d")], tokens=4)
    assert record.e2e_s == pytest.approx(0.7)
    assert record.tpot_s == pytest.approx((0.7 - 0.1) / 3)
    assert tpot_s(1.0, 0.5, 2) == pytest.approx(0.5)
    assert tpot_s(1.0, None, 5) is None
    assert tpot_s(1.0, 0.5, None) is None


def test_tpot_uses_usage_tokens_not_chunk_count() -> None:
    # Two chunks carrying five tokens (e.g. speculative decoding): TPOT divides by 4.
    record = _record(0, 0.0, [(0.1, "ab"), (0.9, "cde")], tokens=5)
    assert record.itl_s == pytest.approx([0.8])
    assert record.tpot_s == pytest.approx(0.8 / 4)


def test_summary_percentiles_match_numpy_and_skip_failures() -> None:
    ok = [
        _record(i, 0.0, [(0.1 * (i + 1), "a"), (0.1 * (i + 1) + 0.05, "b")], tokens=2)
        for i in range(5)
    ]
    failed = RequestRecord(index=5, error="HTTP 502: boom", ttft_s=100.0, output_tokens=7)
    summary = summarize([*ok, failed], duration_s=2.0)
    assert summary.completed == 5
    assert summary.failed == 1
    ttfts_ms = np.array([r.ttft_s for r in ok]) * 1000
    assert summary.ttft.mean_ms == pytest.approx(float(np.mean(ttfts_ms)))
    assert summary.ttft.p50_ms == pytest.approx(float(np.percentile(ttfts_ms, 50)))
    assert summary.ttft.p90_ms == pytest.approx(float(np.percentile(ttfts_ms, 90)))
    assert summary.ttft.p99_ms == pytest.approx(float(np.percentile(ttfts_ms, 99)))
    assert summary.itl.count == 5  # one gap per request, flattened
    assert summary.itl.p50_ms == pytest.approx(50.0)
    assert summary.total_output_tokens == 10
    assert summary.output_throughput_tok_s == pytest.approx(5.0)
    assert summary.request_throughput_rps == pytest.approx(2.5)


def test_empty_metric_has_no_values() -> None:
    stats = MetricStats.of([])
    assert stats.count == 0
    assert stats.mean_ms is None and stats.p99_ms is None


def test_prompt_is_seeded_printable_ascii_of_the_asked_length() -> None:
    a = make_prompt(random.Random(7), 300)
    b = make_prompt(random.Random(7), 300)
    assert a == b
    assert len(a) == 300
    assert len(a.encode("utf-8")) == 300  # one byte = one token for the byte tokenizer
    assert all(0x20 <= ord(c) < 0x7F for c in a)
    assert make_prompt(random.Random(8), 300) != a


def test_arrival_schedule_is_seeded_and_poisson() -> None:
    """Two runs with one seed get the same arrival offsets (so two deployments see the
    same workload); the gaps average 1/rate; no rate means everyone starts at once."""
    from tokentrace.serving.load import arrival_offsets_s

    a = arrival_offsets_s(7, 2000, 4.0)
    assert a == arrival_offsets_s(7, 2000, 4.0)
    assert a != arrival_offsets_s(8, 2000, 4.0)
    assert a[0] == 0.0 and a == sorted(a)
    assert 0.2 < a[-1] / 1999 < 0.3  # mean gap 0.25 s within sampling error
    assert arrival_offsets_s(7, 3, None) == [0.0, 0.0, 0.0]
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="request_rate"):
            arrival_offsets_s(7, 3, bad)


def test_no_full_collection_sweeps_what_existed_before_the_timed_requests() -> None:
    import gc

    from tokentrace.serving.load import frozen_gc

    before = gc.get_freeze_count()
    with frozen_gc():
        # Everything alive at the start is out of the collector's reach, so a
        # collection in the middle of the requests touches only what they allocated.
        assert gc.get_freeze_count() > before
    assert gc.get_freeze_count() == 0
