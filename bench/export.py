"""Export: total CPU per token of a decode process, recording through sending.

The hot-path figure (``bench.hotpath``) leaves out everything that happens after a
request ends: building spans, OTLP/protobuf encoding and the gRPC send. This charges
all of it. A child process plays the decode node, as the worker would: per request it
starts an ``llm.decode`` span, records every emission with a ``TokenRecorder`` in the
``on_tokens`` callback, then hands span building to the tracing span thread
(``Tracing.defer``), where the emissions go out packed onto ``llm.decode`` or as one
``llm.token`` span each. After ``Tracing.shutdown()`` has flushed everything to a sink
process, the child reports its own process CPU time (``time.process_time``: every
thread, the SDK's export thread and gRPC's included).

Each mode gets a fresh process so no mode inherits another's warm caches or garbage,
and modes are interleaved over repetitions (medians reported). The baseline is the same
simulation with tracing off (no endpoint: no recorder, no-op spans), in the same run.
"""

from __future__ import annotations

import argparse
import functools
import gc
import multiprocessing as mp
import multiprocessing.connection as mpc
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from opentelemetry import trace

from bench._common import Figure, add_common_args, emit, median
from bench._sink import OtlpSink, bench_tracing, finish_decode_span
from tokentrace.instrument import TokenRecorder, Tracing
from tokentrace.schemas import attributes as A

__all__ = ["ChildResult", "build_parser", "main", "run", "serve_requests"]

TITLE = "export: process CPU per token, recording + building + encoding + sending"
TARGET_US = 5.0
MODES = ("off", "packed", "spans")  # "off": no endpoint, the same-run baseline
BATCH_SIZE = 8  # reported with every emission
_CHILD_STOP_S = 5.0


@dataclass(frozen=True)
class ChildResult:
    """What one simulated decode process reports about itself."""

    mode: str
    cpu_s: float
    wall_s: float
    tokens: int
    dropped: int  # spans the exporter dropped: its queue was full, or an export failed

    @property
    def us_per_token(self) -> float:
        return self.cpu_s / self.tokens * 1e6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.export",
        description=(
            "Total CPU per token of a simulated decode process (child process; all its "
            "threads) with token emissions sent packed, as one span each, or not traced "
            "(baseline), exporting over OTLP/gRPC to a sink process. Medians over "
            "interleaved repetitions, a fresh process per run. Target: packed <= 5 us/token."
        ),
    )
    parser.add_argument("--requests", type=int, default=200, help="requests per run (default 200)")
    parser.add_argument(
        "--tokens", type=int, default=256, help="token emissions per request (default 256)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per mode, interleaved (default 3)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds one child run may take (600)"
    )
    add_common_args(parser)
    return parser


def _check(args: argparse.Namespace) -> None:
    for name in ("requests", "tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)!r}")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout!r}")


# -- the simulated decode process (runs in the child) ---------------------------------


def _on_tokens(
    recorder: TokenRecorder | None,
) -> Callable[[list[int], int, int, int, str | None], None]:
    """The worker's engine-thread callback (minus handing text to the event loop)."""

    def on_tokens(
        token_ids: list[int], step: int, batch_size: int, prefill: int, finish: str | None
    ) -> None:
        if recorder is not None:
            recorder.record(len(token_ids), step, batch_size, prefill)

    return on_tokens


def _one_request(tracing: Tracing, index: int, tokens: int, first_step: int) -> None:
    span = tracing.tracer.start_span(
        A.SPAN_DECODE,
        kind=trace.SpanKind.SERVER,
        attributes={
            A.GEN_AI_REQUEST_MODEL: "tt-tiny",
            A.REQUEST_ID: f"bench-{index}",
            A.GEN_AI_USAGE_INPUT_TOKENS: 16,
            A.GEN_AI_REQUEST_MAX_TOKENS: tokens,
        },
    )
    recorder = TokenRecorder(tokens) if tracing.enabled else None
    on_tokens = _on_tokens(recorder)
    if recorder is not None:
        recorder.start()
    token_ids = [0]
    for step in range(first_step, first_step + tokens):
        on_tokens(token_ids, step, BATCH_SIZE, 0, None)
    tracing.defer(
        functools.partial(
            finish_decode_span, tracing, span, recorder, tokens, "length", time.time_ns()
        )
    )


def serve_requests(mode: str, endpoint: str | None, requests: int, tokens: int) -> ChildResult:
    """Simulate ``requests`` requests of ``tokens`` emissions in this process; return its
    CPU time from the first request to the end of ``Tracing.shutdown()``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    tracing = bench_tracing(
        None if mode == "off" else endpoint, "spans" if mode == "spans" else "packed"
    )
    gc.collect()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(requests):
        _one_request(tracing, i, tokens, i * tokens)
    tracing.shutdown()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    # Dropped spans would make a mode look cheaper than it is: the run is rejected.
    counts = tracing.exporter_counts()
    dropped = counts.dropped if counts is not None else 0
    return ChildResult(mode, cpu, wall, requests * tokens, dropped)


def _child_entry(
    conn: mpc.Connection, mode: str, endpoint: str, requests: int, tokens: int
) -> None:
    try:
        conn.send(("ok", asdict(serve_requests(mode, endpoint, requests, tokens))))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _stop(proc: mp.process.BaseProcess) -> None:
    proc.join(_CHILD_STOP_S)
    if proc.is_alive():
        proc.terminate()
        proc.join(_CHILD_STOP_S)
    if proc.is_alive():
        proc.kill()
        proc.join()


def run_child(mode: str, endpoint: str, args: argparse.Namespace) -> ChildResult:
    """One simulation in a fresh spawned process; it is reaped whatever happens."""
    ctx = mp.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child_entry,
        args=(writer, mode, endpoint, args.requests, args.tokens),
        name=f"bench-export-{mode}",
        daemon=True,
    )
    proc.start()
    writer.close()
    try:
        if not reader.poll(args.timeout):
            raise TimeoutError(f"{mode} run took longer than {args.timeout:.0f} s")
        try:
            status, payload = reader.recv()
        except EOFError:
            raise RuntimeError(f"{mode} run died (exit code {proc.exitcode})") from None
    finally:
        reader.close()
        _stop(proc)
    if status != "ok":
        raise RuntimeError(f"{mode} run failed in the child:\n{payload}")
    return ChildResult(**payload)


def _checked(result: ChildResult, sink: OtlpSink, bytes_before: int) -> int:
    """Reject runs whose spans did not all reach the sink; return the bytes sent."""
    sent = sink.received_bytes - bytes_before
    if result.dropped:
        raise RuntimeError(f"{result.mode} run dropped {result.dropped} spans")
    if result.mode != "off" and sent == 0:
        raise RuntimeError(f"{result.mode} run exported nothing to the sink")
    return sent


def measure(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """µs of CPU per token and wire bytes per token, per mode, modes rotated each repeat."""
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    wire: dict[str, list[float]] = {m: [] for m in MODES}
    with OtlpSink() as sink:
        for rep in range(args.repeats):
            shift = rep % len(MODES)
            for mode in MODES[shift:] + MODES[:shift]:
                before = sink.received_bytes
                result = run_child(mode, sink.endpoint, args)
                sent = _checked(result, sink, before)
                cpu[mode].append(result.us_per_token)
                wire[mode].append(sent / result.tokens)
    return cpu, wire


def figures(cpu: dict[str, list[float]], wire: dict[str, list[float]]) -> list[Figure]:
    packed, spans, off = (median(cpu[m]) for m in ("packed", "spans", "off"))
    return [
        Figure(
            name="packed µs/token",
            value=packed,
            unit="µs CPU",
            baseline=spans,
            baseline_name="spans mode",
            target=f"≤ {TARGET_US:g} µs",
            met=packed <= TARGET_US,
        ),
        Figure(
            name="spans µs/token",
            value=spans,
            unit="µs CPU",
            baseline=off,
            baseline_name="tracing off",
            target="— (comparison)",
            met=None,
        ),
        Figure(
            name="tracing off µs/token",
            value=off,
            unit="µs CPU",
            baseline=None,
            target="— (baseline)",
            met=None,
        ),
        Figure(
            name="packed wire bytes/token",
            value=median(wire["packed"]),
            unit="B",
            baseline=median(wire["spans"]),
            baseline_name="spans mode",
            target="— (OTLP protobuf)",
            met=None,
        ),
    ]


def run(args: argparse.Namespace) -> list[Figure]:
    _check(args)
    return figures(*measure(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    emit(TITLE, run(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
