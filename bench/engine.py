"""Engine: decode throughput of the reference engine with tracing off vs on.

What a user of tokentrace pays in the end is decode throughput. This runs the
reference engine (``tokentrace.serving.engine``) in this process the way the decode
worker drives it: per request an ``llm.decode`` span, ``TokenRecorder.record`` in the
``on_tokens`` callback on the engine thread, and span emission handed to the tracing
span thread (``Tracing.defer``) when the request finishes, exporting over OTLP/gRPC to
a sink process. Tracing off is the same code with the no-op tracer and no recorder,
exactly as the worker runs without an endpoint.

Each run is a fixed amount of work at a fixed concurrency: ``waves × batch`` prefilled
requests of staggered lengths are queued on a fresh engine whose ``max_batch_size`` is
the batch size, so continuous batching keeps ``batch`` requests running and finished
requests' spans are built and exported while the others decode, as in a server. The
clock stops when every request has finished *and* the span thread and exporter have
flushed, so tracing work that did not overlap decoding is charged too.

Wall-clock throughput on a small shared machine is noisy (runs of identical work
differ by several percent, sometimes far more), so off and on runs are interleaved,
their order rotating each repetition, and medians are reported. Three aids to reading
the result, all per run: how much of the run the engine thread was on a CPU ("engine
busy": what tracing takes from it by holding the GIL or a core shows here, and it does
not move with the host's speed as throughput does); the CPU tracing adds *off* the
engine thread (span thread, exporter, gRPC) as a share of one core; and ``--control``,
a second tracing-off mode measured like the others, whose ratio to the first shows
how large a difference noise alone produces.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from opentelemetry import trace

from bench._common import Figure, add_common_args, emit, median
from bench._sink import OtlpSink, bench_tracing, finish_decode_span
from tokentrace.instrument import TokenRecorder, Tracing
from tokentrace.schemas import attributes as A
from tokentrace.serving.engine import (
    FINISH_LENGTH,
    BlockPool,
    DecodeRequest,
    Engine,
    ModelConfig,
    TinyLM,
)

__all__ = ["RunStats", "Workload", "build_parser", "decode_run", "main", "run"]

TITLE = "engine: decode throughput, tracing off vs on"
TARGET_RATIO = 0.98  # at most 2 % slower
RUN_TIMEOUT_S = 600.0
QUICK = {"batches": "1,8", "repeats": 1, "waves": 1, "tokens": 16}

OnTokens = Callable[[list[int], int, int, int, str | None], None]
OnFinish = Callable[[str, BaseException | None], None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine",
        description=(
            "Wall-clock decode throughput (tokens/s) of the reference engine per batch "
            "size, tracing off vs on (TokenRecorder.record per emission, packed spans "
            "per finished request on the span thread, OTLP/gRPC to a sink process). "
            "Off/on runs interleaved; medians. Target: on >= 0.98 x off at every batch "
            "size. Also reports the engine thread's busy share and the CPU tracing adds "
            "off the engine thread."
        ),
    )
    parser.add_argument(
        "--batches", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)"
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed runs per mode and batch size (default 7)"
    )
    parser.add_argument(
        "--waves", type=int, default=3, help="requests per run = waves x batch size (default 3)"
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=128,
        help="mean output tokens per request; lengths spread over 1/2..3/2 of it (default 128)",
    )
    parser.add_argument(
        "--prompt", type=int, default=16, help="prompt tokens per request (default 16)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads, like the worker's --threads (1)"
    )
    parser.add_argument(
        "--spans",
        action="store_true",
        help="also measure the spans wire mode (one OTLP span per token; no target)",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="also measure a second tracing-off mode (A/A): its ratio is the noise floor",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            "smoke-test settings: batches 1,8, 1 repeat, 1 wave, 16 tokens (overrides "
            "those flags; far too short to judge the target)"
        ),
    )
    add_common_args(parser)
    return parser


def _settings(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``--quick`` applied and checked."""
    out = argparse.Namespace(**vars(args))
    if out.quick:
        for key, value in QUICK.items():
            setattr(out, key, value)
    out.batch_sizes = [int(b) for b in str(out.batches).split(",") if b.strip()]
    if not out.batch_sizes or min(out.batch_sizes) < 1:
        raise ValueError(f"--batches must list positive sizes, got {out.batches!r}")
    for name in ("repeats", "waves", "prompt", "threads"):
        if getattr(out, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(out, name)!r}")
    if out.tokens < 2:
        raise ValueError(f"--tokens must be >= 2, got {out.tokens!r}")
    return out


@dataclass(frozen=True)
class Workload:
    """One run's requests: the same prompts and lengths for every mode."""

    batch: int
    prompts: list[list[int]]
    lengths: list[int]

    @classmethod
    def make(cls, batch: int, waves: int, tokens: int, prompt: int) -> Workload:
        rng = random.Random(batch)  # deterministic, different per batch size
        n = batch * waves
        lengths = [rng.randint(max(1, tokens // 2), tokens + tokens // 2) for _ in range(n)]
        prompts = [[(i * 31 + j) % 256 for j in range(prompt)] for i in range(n)]
        return cls(batch, prompts, lengths)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def pool_blocks(self, config: ModelConfig) -> int:
        """Blocks for every prefilled prompt plus every running request's growth."""
        per_prompt = -(-len(self.prompts[0]) // config.block_size)
        longest = len(self.prompts[0]) + max(self.lengths)
        growth = -(-longest // config.block_size)
        return len(self.prompts) * per_prompt + self.batch * (growth + 1)


@dataclass(frozen=True)
class RunStats:
    """One run: decode throughput, and CPU seconds of the engine thread and of the
    whole process over the same interval."""

    tokens_per_s: float
    wall_s: float
    engine_cpu_s: float
    process_cpu_s: float

    @property
    def engine_busy(self) -> float:
        """Engine thread on a CPU, in % of the run: what it loses is time spent waiting
        for the GIL or a core. Unlike throughput this does not move with the speed of
        a shared host's CPUs."""
        return self.engine_cpu_s / self.wall_s * 100

    @property
    def off_engine_share(self) -> float:
        """CPU of every other thread (span thread, exporter, gRPC) in % of one core."""
        return max(0.0, self.process_cpu_s - self.engine_cpu_s) / self.wall_s * 100


class _Countdown:
    """Set ``event`` once ``n`` requests have finished; keep the engine thread's CPU
    time at that moment (the last ``on_finish`` runs on the engine thread, which is
    fresh per run, so that is its CPU for the whole run)."""

    def __init__(self, n: int) -> None:
        self._left = n
        self._lock = threading.Lock()
        self.event = threading.Event()
        self.engine_cpu_s = 0.0

    def done(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self.engine_cpu_s = time.thread_time()
                self.event.set()


@dataclass
class _Outcome:
    tokens: int = 0
    reason: str | None = None
    error: BaseException | None = None


def _callbacks(
    tracing: Tracing, span: trace.Span, max_tokens: int, countdown: _Countdown, out: _Outcome
) -> tuple[OnTokens, OnFinish]:
    """``on_tokens``/``on_finish`` as the worker builds them, minus handing text to the
    event loop (identical in both modes, so it would only dilute the difference)."""
    recorder = TokenRecorder(max_tokens) if tracing.enabled else None

    def on_tokens(
        token_ids: list[int], step: int, batch_size: int, prefill: int, finish: str | None
    ) -> None:
        if recorder is not None:
            recorder.record(len(token_ids), step, batch_size, prefill)
        out.tokens += len(token_ids)

    def on_finish(reason: str, error: BaseException | None) -> None:
        out.reason, out.error = reason, error
        end = time.time_ns()
        tracing.defer(
            lambda: finish_decode_span(
                tracing, span, recorder, out.tokens, out.reason or "abort", end
            )
        )
        countdown.done()

    if recorder is not None:
        recorder.start()
    return on_tokens, on_finish


def _submit_all(
    engine: Engine, tracing: Tracing, work: Workload, countdown: _Countdown
) -> list[_Outcome]:
    """Prefill every prompt, start its ``llm.decode`` span and recorder (in the worker
    that happens on the event loop, not the engine thread) and queue the request. The
    engine is not started yet: none of this is timed and the first step runs a full
    batch."""
    outcomes = []
    for i, (prompt, length) in enumerate(zip(work.prompts, work.lengths, strict=True)):
        blocks = engine.prefill(prompt).block_ids
        span = tracing.tracer.start_span(
            A.SPAN_DECODE,
            kind=trace.SpanKind.SERVER,
            attributes={
                A.REQUEST_ID: f"bench-{i}",
                A.GEN_AI_USAGE_INPUT_TOKENS: len(prompt),
                A.GEN_AI_REQUEST_MAX_TOKENS: length,
            },
        )
        out = _Outcome()
        on_tokens, on_finish = _callbacks(tracing, span, length, countdown, out)
        engine.submit(
            DecodeRequest(
                f"bench-{i}",
                prompt,
                blocks,
                length,
                ignore_eos=True,
                on_tokens=on_tokens,
                on_finish=on_finish,
            )
        )
        outcomes.append(out)
    return outcomes


def _drain(tracing: Tracing) -> None:
    """Wait until every deferred span is built and exported (a no-op when off: the
    span work already ran inline)."""
    built = threading.Event()
    tracing.defer(built.set)
    if not built.wait(RUN_TIMEOUT_S):
        raise TimeoutError("the span thread did not catch up")
    if tracing.provider is not None:
        tracing.provider.force_flush()


def _verify(work: Workload, outcomes: list[_Outcome], pool: BlockPool) -> None:
    for length, out in zip(work.lengths, outcomes, strict=True):
        if out.error is not None or out.reason != FINISH_LENGTH or out.tokens != length:
            raise RuntimeError(
                f"request ended {out.reason!r} after {out.tokens}/{length} tokens: {out.error}"
            )
    if pool.num_free != pool.num_blocks:
        raise RuntimeError(f"{pool.num_blocks - pool.num_free} KV blocks leaked")


def decode_run(model: TinyLM, work: Workload, tracing: Tracing) -> RunStats:
    """Decode ``work`` on a fresh engine and KV pool (the same block layout every run),
    timed from the engine's start until the last request finished and its spans were
    flushed."""
    pool = BlockPool(model.config, work.pool_blocks(model.config))
    engine = Engine(model, pool, max_batch_size=work.batch)
    countdown = _Countdown(len(work.lengths))
    try:
        outcomes = _submit_all(engine, tracing, work, countdown)
        gc.collect()  # start every run with the same (empty) garbage
        cpu0, start = time.process_time(), time.perf_counter()
        engine.start()
        if not countdown.event.wait(RUN_TIMEOUT_S):
            raise TimeoutError(f"batch {work.batch} run did not finish")
        _drain(tracing)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    finally:
        engine.shutdown()
    _verify(work, outcomes, pool)
    return RunStats(work.tokens / wall, wall, countdown.engine_cpu_s, cpu)


def measure_batch(
    model: TinyLM, work: Workload, modes: dict[str, Tracing], repeats: int
) -> dict[str, list[RunStats]]:
    """Every mode: one untimed warm-up run, then ``repeats`` rounds with the modes'
    order rotating so drift on a shared machine hits them alike."""
    names = list(modes)
    for name in names:
        decode_run(model, work, modes[name])
    results: dict[str, list[RunStats]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(decode_run(model, work, modes[name]))
    return results


def _tps(runs: list[RunStats]) -> float:
    return median([r.tokens_per_s for r in runs])


def _comparison(name: str, runs: list[RunStats], off: float) -> Figure:
    return Figure(
        name=name,
        value=_tps(runs),
        unit="tok/s",
        baseline=off,
        baseline_name="tracing off",
        target="— (comparison)",
        met=None,
    )


def _share(
    name: str, unit: str, results: dict[str, list[RunStats]], stat: Callable[[RunStats], float]
) -> Figure:
    """A per-run diagnostic of the packed runs next to the tracing-off runs."""
    return Figure(
        name=name,
        value=median([stat(r) for r in results["packed"]]),
        unit=unit,
        baseline=median([stat(r) for r in results["off"]]),
        baseline_name="tracing off",
        target="— (where it goes)",
        met=None,
    )


def figures(batch: int, results: dict[str, list[RunStats]]) -> list[Figure]:
    off, on = _tps(results["off"]), _tps(results["packed"])
    out = [
        Figure(
            name=f"batch {batch} tracing on",
            value=on,
            unit="tok/s",
            baseline=off,
            baseline_name="tracing off",
            target=f"≥ {TARGET_RATIO:g}× off",
            met=on >= TARGET_RATIO * off,
        ),
        _share(f"batch {batch} engine busy", "% wall", results, lambda r: r.engine_busy),
        _share(f"batch {batch} off-engine CPU", "% core", results, lambda r: r.off_engine_share),
    ]
    if "spans" in results:
        out.append(_comparison(f"batch {batch} spans mode", results["spans"], off))
    if "control" in results:
        out.append(_comparison(f"batch {batch} off again (A/A)", results["control"], off))
    return out


def _modes(settings: argparse.Namespace, endpoint: str) -> dict[str, Tracing]:
    modes = {"off": bench_tracing(None), "packed": bench_tracing(endpoint, "packed")}
    if settings.spans:
        modes["spans"] = bench_tracing(endpoint, "spans")
    if settings.control:
        modes["control"] = bench_tracing(None)
    return modes


def run(args: argparse.Namespace) -> list[Figure]:
    settings = _settings(args)
    torch.set_num_threads(settings.threads)
    model = TinyLM(ModelConfig())
    out: list[Figure] = []
    with OtlpSink() as sink:
        modes = _modes(settings, sink.endpoint)
        try:
            for batch in settings.batch_sizes:
                work = Workload.make(batch, settings.waves, settings.tokens, settings.prompt)
                out.extend(figures(batch, measure_batch(model, work, modes, settings.repeats)))
        finally:
            for tracing in modes.values():
                tracing.shutdown()
        if sink.exports == 0:
            raise RuntimeError("the OTLP sink received nothing: tracing-on runs did not export")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    emit(TITLE, run(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
