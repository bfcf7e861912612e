"""Hot path: CPU nanoseconds per token emission on the engine thread.

The only instrumentation on a decode engine's thread is the ``on_tokens`` callback.
This measures what that callback costs per emission, in CPU time of the calling thread
(``time.thread_time_ns``), three ways in the same run and the same loop:

- tokentrace: ``TokenRecorder.record`` into preallocated arrays, as the worker does;
- OpenTelemetry SDK: one ``llm.token`` span per emission (``start_span`` + ``end``,
  the attributes tokentrace's token spans carry), on a tracer as ``setup_tracing``
  builds it: a batch queue (like the SDK's BatchSpanProcessor) and the SDK's OTLP/gRPC
  exporter exporting to a sink process;
- no tracing: the same callback with nothing to do.

Span export runs on the exporter's own thread and is not counted: only what the engine
thread pays. The queue is flushed between repetitions, outside the timed loop.
Thread CPU time rather than wall time because the machine is shared and noisy; cases
are interleaved in every repetition and medians reported.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from opentelemetry import trace

from bench._common import Figure, add_common_args, emit, median
from bench._sink import OtlpSink, bench_tracing
from tokentrace.instrument import TokenRecorder, Tracing
from tokentrace.schemas import attributes as A

__all__ = ["build_parser", "main", "run"]

TITLE = "hot path: CPU per token emission on the engine thread"
TARGET_NS = 1000.0
TARGET_RATIO = 20.0
BATCH_SIZE = 8  # reported with every emission; its value does not change the cost

OnTokens = Callable[[list[int], int, int, int, str | None], None]
CallbackFactory = Callable[[int], OnTokens]  # tokens per request → a fresh callback


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hotpath",
        description=(
            "CPU ns per token emission on the calling thread (time.thread_time_ns): "
            "tokentrace's TokenRecorder.record vs an OpenTelemetry SDK span per token "
            "(batch queue + OTLP/gRPC exporter to a sink process; export is on "
            "the exporter's thread and not counted) vs no tracing. Medians over repetitions. "
            "Targets: tokentrace <= 1000 ns, SDK span / tokentrace >= 20x."
        ),
    )
    parser.add_argument(
        "--requests", type=int, default=32, help="requests per repetition (default 32)"
    )
    parser.add_argument(
        "--tokens", type=int, default=256, help="token emissions per request (default 256)"
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed repetitions per case (default 7)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed repetitions per case first (default 1)"
    )
    add_common_args(parser)
    return parser


def _check(args: argparse.Namespace) -> None:
    for name in ("requests", "tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)!r}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup!r}")


def _worker_callback(recorder: TokenRecorder | None) -> OnTokens:
    """The worker's ``on_tokens`` tracing part: record if there is a recorder (None:
    the floor. The worker itself records with tracing off too, for its ITL histogram,
    so there it pays the recorder's cost either way)."""

    def on_tokens(
        token_ids: list[int], step: int, batch_size: int, prefill: int, finish: str | None
    ) -> None:
        if recorder is not None:
            recorder.record(len(token_ids), step, batch_size, prefill)

    return on_tokens


def no_tracing(tokens: int) -> OnTokens:
    """The floor: the same callback with nothing to record."""
    return _worker_callback(None)


def tokentrace_recorder(tokens: int) -> OnTokens:
    """Tracing on: a recorder sized to ``max_tokens`` and started, as the worker does."""
    recorder = TokenRecorder(tokens)
    recorder.start()
    return _worker_callback(recorder)


def sdk_span_factory(tracer: trace.Tracer) -> CallbackFactory:
    """Callbacks that create and end one ``llm.token`` span per emission, under a
    per-request parent, carrying what ``TokenRecorder.emit_spans`` puts on each."""

    def factory(tokens: int) -> OnTokens:
        parent = trace.set_span_in_context(tracer.start_span(A.SPAN_DECODE))
        index = 0

        def on_tokens(
            token_ids: list[int], step: int, batch_size: int, prefill: int, finish: str | None
        ) -> None:
            nonlocal index
            span = tracer.start_span(
                A.SPAN_TOKEN,
                context=parent,
                kind=trace.SpanKind.INTERNAL,
                attributes={
                    A.TOKEN_INDEX: index,
                    A.TOKEN_COUNT: len(token_ids),
                    A.ENGINE_STEP: step,
                    A.BATCH_SIZE: batch_size,
                    A.STEP_PREFILL_TOKENS: prefill,
                },
            )
            span.end()
            index += len(token_ids)

        return on_tokens

    return factory


def _time_request(on_tokens: OnTokens, tokens: int) -> int:
    """Thread CPU ns for ``tokens`` single-token emissions through ``on_tokens``."""
    token_ids = [0]
    start = time.thread_time_ns()
    for step in range(tokens):
        on_tokens(token_ids, step, BATCH_SIZE, 0, None)
    return time.thread_time_ns() - start


def measure(factory: CallbackFactory, requests: int, tokens: int) -> float:
    """CPU ns per emission over ``requests`` requests; callbacks are created (as the
    worker creates its recorder) outside the timed loops."""
    callbacks = [factory(tokens) for _ in range(requests)]
    total = sum(_time_request(cb, tokens) for cb in callbacks)
    return total / (requests * tokens)


def _flush(tracing: Tracing) -> None:
    """Let the export queue drain between repetitions (not timed) so it never fills."""
    if tracing.provider is not None:
        tracing.provider.force_flush()


def measure_all(
    cases: dict[str, CallbackFactory], args: argparse.Namespace, tracing: Tracing
) -> dict[str, list[float]]:
    """Interleave the cases in every repetition, rotating their order, so slow phases
    of a noisy machine hit all of them alike."""
    names = list(cases)
    for _ in range(args.warmup):
        for name in names:
            measure(cases[name], args.requests, args.tokens)
        _flush(tracing)
    results: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(measure(cases[name], args.requests, args.tokens))
            _flush(tracing)
    return results


def figures(results: dict[str, list[float]]) -> list[Figure]:
    ours, sdk, off = (median(results[k]) for k in ("tokentrace", "sdk", "off"))
    ratio = sdk / ours
    return [
        Figure(
            "tokentrace ns/token",
            ours,
            "ns",
            sdk,
            f"≤ {TARGET_NS:,.0f} ns",
            ours <= TARGET_NS,
            "OTel SDK span/token",
        ),
        Figure(
            "SDK span / tokentrace",
            ratio,
            "×",
            None,
            f"≥ {TARGET_RATIO:.0f}×",
            ratio >= TARGET_RATIO,
        ),
        Figure("no tracing ns/token", off, "ns", None, "— (loop + callback)", None),
    ]


def run(args: argparse.Namespace) -> list[Figure]:
    _check(args)
    with OtlpSink() as sink:
        tracing = bench_tracing(sink.endpoint, token_spans="spans")
        try:
            cases: dict[str, CallbackFactory] = {
                "tokentrace": tokentrace_recorder,
                "sdk": sdk_span_factory(tracing.tracer),
                "off": no_tracing,
            }
            results = measure_all(cases, args, tracing)
        finally:
            tracing.shutdown()
        if sink.exports == 0:
            raise RuntimeError("the OTLP sink received nothing: the SDK spans were not exported")
    return figures(results)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    emit(TITLE, run(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
