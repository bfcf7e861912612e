"""verify's comparison, request by request: counts must agree exactly, times are
compared as |client - stored| over the pairs, and a request the store never got is a
mismatch of everything. Its last line says what disagreed."""

from __future__ import annotations

import pytest

from tokentrace.serving.load import RequestRecord
from tokentrace.serving.verify import Stored, compare, verdict


def _record(rid: str, ttft: float, gaps: list[float], tokens: int) -> RequestRecord:
    e2e = ttft + sum(gaps)
    tpot = (e2e - ttft) / (tokens - 1)
    return RequestRecord(
        index=0, request_id=rid, ttft_s=ttft, itl_s=gaps, e2e_s=e2e, tpot_s=tpot,
        output_tokens=tokens,
    )  # fmt: skip


def _stored(ttft: float, gaps: list[float], tokens: int) -> Stored:
    e2e = ttft + sum(gaps)
    tpot = (e2e - ttft) / (tokens - 1)
    return Stored("t", ttft, e2e, tpot, tokens, gaps, tokens)


def test_pairs_are_compared_as_absolute_differences_per_request() -> None:
    records = [
        _record("a", 0.100, [0.010, 0.010], 3),
        _record("b", 0.200, [0.020, 0.020], 3),
    ]
    stored = {
        "a": _stored(0.099, [0.0105, 0.0095], 3),  # client 1 ms later; gaps ±0.5 ms
        "b": _stored(0.203, [0.020, 0.020], 3),  # client 3 ms earlier
    }
    by = {a.metric: a for a in compare(records, stored, {"TTFT": 2.5, "E2E": 2.5})}
    assert all(a.count_mismatches == 0 and a.requests == 2 for a in by.values())
    assert by["TTFT"].median_ms == pytest.approx(2.0)  # of |+1| and |-3|
    assert by["ITL"].median_ms == pytest.approx(0.25)  # of 0.5, 0.5, 0, 0
    assert by["TTFT"].ok and by["output tokens"].median_ms is None
    assert verdict(list(by.values())) == "agreed: every count equal, every median within its limit"


def test_a_gap_more_or_a_missing_row_is_a_count_mismatch() -> None:
    records = [
        _record("a", 0.1, [0.01, 0.01, 0.01], 4),  # one chunk more than stored
        _record("b", 0.1, [0.01], 2),  # never stored
        RequestRecord(index=2, request_id="c", error="HTTP 500"),  # failed: not compared
    ]
    stored = {"a": _stored(0.1, [0.01, 0.02], 4)}
    by = {a.metric: a for a in compare(records, stored)}
    assert by["ITL"].count_mismatches == 2 and by["ITL"].requests == 2
    assert by["output tokens"].count_mismatches == 1  # b only: a's usage agrees
    assert by["TTFT"].count_mismatches == 1 and not by["TTFT"].ok
    line = verdict(list(by.values()), failed_requests=1)
    assert line.startswith("disagreed: ")
    assert "ITL: 2 of 2 requests differ in count" in line and "1 requests failed" in line


def test_a_median_over_its_limit_is_named_with_both_figures() -> None:
    records = [_record("a", 0.105, [0.01], 2)]
    by = compare(records, {"a": _stored(0.100, [0.01], 2)}, {"TTFT": 2.0, "E2E": 3.0})
    line = verdict(by)
    assert line == "disagreed: TTFT: median |Δ| 5.000 ms > 2 ms; E2E: median |Δ| 5.000 ms > 3 ms"
