"""The exporter's bounded queue: ending a span never waits for the collector, and every
span ended is counted as queued, exporting, exported or dropped (and why)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tokentrace.instrument import setup_tracing
from tokentrace.instrument.export import CountingBatchProcessor
from tokentrace.serving.procs import free_port

pytestmark = pytest.mark.timeout(120)

EXPORT_LOG = "tokentrace.instrument.export"


def test_a_dead_collector_never_blocks_end_and_every_span_is_accounted_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=EXPORT_LOG)
    tracing = setup_tracing(
        "decode",
        node_id="n1",
        endpoint=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        max_queue_size=16,
        export_timeout_s=2.0,
    )
    for i in range(1000):
        tracing.tracer.start_span(f"span-{i}").end()
    emitted = tracing.exporter_counts()
    assert emitted is not None
    # end() returned 1000 times while the exporter was stuck retrying one batch: the
    # queue overflowed instead of making end() wait for room.
    assert emitted.dropped_queue_full > 0
    assert emitted.queued <= emitted.queue_capacity == 16

    tracing.shutdown()
    final = tracing.exporter_counts()
    assert final is not None
    assert final.exported == 0 and final.exporting == 0
    assert final.dropped_export_failed > 0 and final.failed_exports > 0
    assert final.dropped_queue_full == emitted.dropped_queue_full  # nothing queued since
    assert (
        final.exported + final.dropped_queue_full + final.dropped_export_failed + final.queued
        == final.ended
        == 1000
    )
    warnings = [r.getMessage() for r in caplog.records if r.name == EXPORT_LOG]
    assert warnings and "because the queue of 16 was full" in warnings[-1], warnings

    tracing.tracer.start_span("too late").end()  # after shutdown: counted, not queued
    late = tracing.exporter_counts()
    assert late is not None and late.dropped_after_shutdown == 1 and late.ended == 1001


def test_counts_are_none_when_tracing_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for env in ("TOKENTRACE_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(env, raising=False)
    assert setup_tracing("decode", node_id="n1").exporter_counts() is None


def test_bad_queue_settings_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="max_queue_size must be >= 1, got 0"):
        setup_tracing("decode", endpoint="http://127.0.0.1:1", max_queue_size=0)
    with pytest.raises(ValueError, match="export_timeout_s must be positive, got 0"):
        setup_tracing("decode", endpoint="http://127.0.0.1:1", export_timeout_s=0)
    with pytest.raises(ValueError, match=r"max_export_batch_size \(8\) must be <= max_queue"):
        CountingBatchProcessor(_Refusing(), max_queue_size=4, max_export_batch_size=8)


class _Refusing(SpanExporter):
    """A collector that refuses every batch (as the OTLP exporter reports a batch it
    gave up on); the processor under test is real."""

    def __init__(self) -> None:
        self.batches = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.batches += 1
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        pass


def test_drops_are_logged_at_most_once_per_interval_and_once_at_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("vllm.tokentrace")  # the vLLM plugin's, for one
    caplog.set_level(logging.WARNING, logger=logger.name)
    exporter = _Refusing()
    processor = CountingBatchProcessor(
        exporter, max_queue_size=4, max_export_batch_size=4, warn_interval_s=3600, logger=logger
    )
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    for _ in range(10):
        for _ in range(4):
            tracer.start_span("refused").end()
        assert processor.force_flush()
    provider.shutdown()
    counts = processor.counts()
    assert counts.dropped_export_failed == 40 and counts.failed_exports == exporter.batches == 10
    warnings = [r.getMessage() for r in caplog.records if r.name == logger.name]
    # Ten failed batches: one warning from the export thread within the hour at most,
    # and the one at shutdown for whatever it had not reported yet.
    assert 1 <= len(warnings) <= 2, warnings
    assert "40 because their export failed" in warnings[-1]
