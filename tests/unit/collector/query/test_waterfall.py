"""The terminal waterfall on hand-built spans."""

from __future__ import annotations

from rich.console import Console

from tokentrace.collector.query.waterfall import TraceSpan, render_waterfall

MS = 1_000_000


def _span(name: str, node: str, start_ms: float, dur_ms: float, **attrs: str) -> TraceSpan:
    return TraceSpan(
        name, "Server", "svc", node, int(start_ms * MS), int(dur_ms * MS), "Unset", dict(attrs)
    )


def _text(spans: list[TraceSpan]) -> str:
    console = Console(width=160, record=True)
    console.print(render_waterfall("ab" * 16, spans))
    return console.export_text()


def test_lanes_bars_and_condensed_tokens() -> None:
    spans = [
        _span("llm.request", "router-0", 0, 100, **{"gen_ai.server.time_to_first_token": "0.03"}),
        _span("llm.prefill", "prefill-0", 2, 20),
        _span("llm.decode", "decode-1", 24, 75),
        _span(
            "llm.kv_transfer",
            "decode-1",
            24,
            4,
            **{"tokentrace.kv.bytes": "1048576", "tokentrace.kv.src_node": "prefill-0"},
        ),
        _span("llm.token", "decode-1", 24, 6, **{"tokentrace.token.index": "0"}),
        _span("llm.token", "decode-1", 30, 2, **{"tokentrace.token.index": "1"}),
        _span(
            "llm.token",
            "decode-1",
            32,
            10,
            **{"tokentrace.token.index": "2", "tokentrace.token.count": "3"},
        ),
    ]
    text = _text(spans)
    assert "trace abababababababababababababababab — 7 spans, 100.00 ms" in text
    lines = text.splitlines()
    # one row per non-token span, tokens condensed into one row per node
    assert sum("llm.token" in line for line in lines) == 1
    assert "llm.token ×3" in text and "5 tokens" in text
    assert "ITL p50 6.00 / max 10.00 ms" in text  # gaps exclude the first emission
    assert "1024 KiB from prefill-0" in text and "TTFT 30.00 ms" in text
    router = next(line for line in lines if "llm.request" in line)
    assert "router-0" in router and router.count("█") == 48  # the whole timeline
    assert sum("decode-1" in line for line in lines) == 1  # the lane is named once


def test_single_emission_has_no_itl() -> None:
    text = _text(
        [
            _span("llm.decode", "d", 0, 5),
            _span("llm.token", "d", 0, 5, **{"tokentrace.token.index": "0"}),
        ]
    )
    assert "one emission" in text


def test_worker_lanes_are_moved_onto_the_router_clock() -> None:
    from dataclasses import replace

    offsets = {
        "tokentrace.prefill.node": "prefill-0",
        "tokentrace.prefill.clock_offset_s": "-0.05",
    }
    spans = [
        replace(_span("llm.request", "router-0", 0, 100, **offsets), span_id="r"),
        # The prefill node's clock is 50 ms slow: its span seems to start before the request.
        replace(_span("llm.prefill", "prefill-0", -48, 20), span_id="p", parent_span_id="r"),
    ]
    text = _text(spans)
    prefill = next(line for line in text.splitlines() if "llm.prefill" in line)
    assert " 2.00 " in prefill and "clock +50.00 ms" in prefill
    assert "100.00 ms" in text  # the trace's extent on one clock
