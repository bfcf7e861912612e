"""``tokentrace load``: a streaming OpenAI-completions load generator.

Each request is measured as vLLM's ``benchmarks/serve.py`` measures it (its request
functions): with ``time.perf_counter()`` from just before the request is sent,
TTFT = first chunk with non-empty text − start, ITL = gaps between successive content
chunks, E2E = the last chunk with choices − start, output tokens from the usage chunk,
TPOT = (E2E − TTFT) / (output tokens − 1) when there is more than one output token.
Percentiles are ``numpy.percentile`` over successful requests; ITL percentiles are over
all gaps of all requests.

Requests start as soon as a concurrency slot is free, or, with a request rate, at
arrival times drawn from a Poisson process (exponential gaps, as vLLM's benchmark's
``--request-rate``) seeded like the prompts: the same seed gives two deployments the
same prompts arriving at the same offsets from the run's start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tokentrace.schemas.auth import auth_headers
from tokentrace.schemas.tls import (
    CA_CERT_ENV,
    CA_CERT_HELP,
    certificate_error,
    client_verify,
    resolve_ca_cert,
)
from tokentrace.serving import openai_protocol as P

__all__ = [
    "LoadResult",
    "LoadSummary",
    "MetricStats",
    "RequestRecord",
    "StreamTimeline",
    "add_arguments",
    "arrival_offsets_s",
    "make_prompt",
    "run_from_args",
    "run_load",
    "summarize",
    "tpot_s",
]

_PRINTABLE = [chr(c) for c in range(0x20, 0x7F)]  # printable ASCII: one byte, one token
_HTTP_TIMEOUT_S = 6 * 60 * 60  # as vLLM's benchmark client: a stream may take long


# -- per-request measurement -----------------------------------------------------------


class StreamTimeline:
    """Chunk arrival times of one streamed response, relative to nothing: all times are
    ``time.perf_counter()`` seconds as given. Pure; fed one chunk at a time."""

    def __init__(self, start_s: float) -> None:
        self.start_s = start_s
        self.content_times_s: list[float] = []  # chunks with non-empty text
        self.last_choice_s: float | None = None  # last chunk with choices, text or not

    def add_chunk(self, t_s: float, text: str, has_choices: bool = True) -> None:
        if has_choices:
            self.last_choice_s = t_s
        if text:
            self.content_times_s.append(t_s)

    @property
    def ttft_s(self) -> float | None:
        return self.content_times_s[0] - self.start_s if self.content_times_s else None

    @property
    def itl_s(self) -> list[float]:
        t = self.content_times_s
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    def e2e_s(self, end_s: float) -> float:
        """Start → last chunk with choices (vLLM's latency); ``end_s`` if there was none."""
        last = self.last_choice_s if self.last_choice_s is not None else end_s
        return last - self.start_s


def tpot_s(e2e_s: float, ttft_s: float | None, output_tokens: int | None) -> float | None:
    """(E2E − TTFT) / (output tokens − 1); None unless there are 2+ output tokens."""
    if ttft_s is None or output_tokens is None or output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


@dataclass
class RequestRecord:
    """One request's outcome. Times in seconds; ``chunk_times_s`` are content-chunk
    arrivals relative to the request start; ``start_s`` is relative to the run start."""

    index: int
    request_id: str | None = None
    start_s: float = 0.0
    prompt_len: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    chunk_times_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    tpot_s: float | None = None
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def success(self) -> bool:
        return self.error is None

    def fill_from(self, timeline: StreamTimeline, end_s: float) -> None:
        """Derive the timing fields from a finished stream (output_tokens set first)."""
        self.ttft_s = timeline.ttft_s
        self.itl_s = timeline.itl_s
        self.chunk_times_s = [t - timeline.start_s for t in timeline.content_times_s]
        self.e2e_s = timeline.e2e_s(end_s)
        self.tpot_s = tpot_s(self.e2e_s, self.ttft_s, self.output_tokens)


# -- summary -------------------------------------------------------------------------


@dataclass
class MetricStats:
    """Mean and percentiles of one metric, in milliseconds; None over no samples."""

    mean_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    count: int

    @classmethod
    def of(cls, values_s: Sequence[float]) -> MetricStats:
        if not values_s:
            return cls(None, None, None, None, 0)
        ms = np.asarray(values_s, dtype=float) * 1000.0
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        return cls(float(np.mean(ms)), p50, p90, p99, len(values_s))


@dataclass
class LoadSummary:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput_rps: float
    output_throughput_tok_s: float
    ttft: MetricStats
    tpot: MetricStats
    itl: MetricStats
    e2e: MetricStats


def summarize(records: Sequence[RequestRecord], duration_s: float) -> LoadSummary:
    """Aggregate successful requests; failed ones count only as failures."""
    ok = [r for r in records if r.success]
    output_tokens = sum(r.output_tokens or 0 for r in ok)
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    return LoadSummary(
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput_rps=len(ok) * per_s,
        output_throughput_tok_s=output_tokens * per_s,
        ttft=MetricStats.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot=MetricStats.of([r.tpot_s for r in ok if r.tpot_s is not None]),
        itl=MetricStats.of([gap for r in ok for gap in r.itl_s]),
        e2e=MetricStats.of([r.e2e_s for r in ok if r.e2e_s is not None]),
    )


@dataclass
class LoadResult:
    url: str
    model: str
    requests: int
    concurrency: int
    input_len: int
    output_len: int
    seed: int
    records: list[RequestRecord]
    summary: LoadSummary
    request_rate: float | None = None  # None: closed loop (concurrency slots only)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["records"] = [asdict(r) | {"success": r.success} for r in self.records]
        return out


# -- the client ----------------------------------------------------------------------


def make_prompt(rng: random.Random, length: int) -> str:
    """``length`` random printable ASCII characters (= tokens for a byte-level tokenizer)."""
    return "".join(rng.choices(_PRINTABLE, k=length))


def arrival_offsets_s(seed: int, requests: int, request_rate: float | None) -> list[float]:
    """Each request's start, in seconds from the run's start: all 0 without a rate, else
    a Poisson process of ``request_rate`` per second from its own seeded generator (so
    the prompts of a seed are the same with or without a rate)."""
    if request_rate is None:
        return [0.0] * requests
    if not (request_rate > 0 and request_rate != float("inf")):
        raise ValueError(f"request_rate must be positive and finite, got {request_rate!r}")
    rng = random.Random(f"tokentrace-arrivals-{seed}")
    offsets, t = [], 0.0
    for _ in range(requests):
        offsets.append(t)
        t += rng.expovariate(request_rate)
    return offsets


async def _default_model(client: httpx.AsyncClient, url: str) -> str:
    resp = await client.get(f"{url}/v1/models")
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"{url}/v1/models lists no model")
    return str(data[0]["id"])


async def _one_request(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    prompt: str,
    output_len: int,
    record: RequestRecord,
    run_start_s: float,
) -> None:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    start_s = time.perf_counter()
    record.start_s = start_s - run_start_s
    timeline = StreamTimeline(start_s)
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            record.request_id = resp.headers.get("x-request-id")
            if resp.status_code >= 400:
                text = (await resp.aread()).decode("utf-8", "replace")
                record.error = f"HTTP {resp.status_code}: {text[:500]}"
                return
            async for line in resp.aiter_lines():
                event = P.parse_sse_data(line)
                if event is None or event == P.DONE:
                    continue
                now_s = time.perf_counter()
                if "error" in event:
                    error = event["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    record.error = f"stream error: {message}"
                    continue
                choices = event.get("choices")
                if choices:
                    timeline.add_chunk(now_s, P.chunk_text(event))
                usage = event.get("usage")
                if isinstance(usage, dict):
                    if isinstance(usage.get("completion_tokens"), int):
                        record.output_tokens = usage["completion_tokens"]
                    if isinstance(usage.get("prompt_tokens"), int):
                        record.prompt_tokens = usage["prompt_tokens"]
    except (httpx.HTTPError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    end_s = time.perf_counter()
    if record.error is None and not timeline.content_times_s:
        record.error = "the stream carried no text"
    if record.output_tokens is None:
        # No usage chunk: count content chunks (one token each for the byte tokenizer).
        record.output_tokens = len(timeline.content_times_s)
    record.fill_from(timeline, end_s)


async def run_load(
    url: str,
    requests: int,
    concurrency: int,
    input_len: int,
    output_len: int,
    model: str | None = None,
    seed: int = 0,
    progress: bool = True,
    ca_file: Path | None = None,
    request_rate: float | None = None,
) -> LoadResult:
    """Send ``requests`` streaming completions with at most ``concurrency`` in flight and
    measure each; with ``request_rate``, request ``i`` starts no earlier than its
    seeded Poisson arrival (:func:`arrival_offsets_s`). An ``https://`` server is
    verified against ``ca_file`` (else the system's CAs). Request failures are
    recorded, never raised; raises only when the model cannot be resolved from
    ``{url}/v1/models`` (ValueError also for an unusable ``ca_file`` or rate)."""
    for name, value in (("requests", requests), ("concurrency", concurrency)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    for name, value in (("input_len", input_len), ("output_len", output_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    url = url.rstrip("/")
    arrivals_s = arrival_offsets_s(seed, requests, request_rate)
    rng = random.Random(seed)
    prompts = [make_prompt(rng, input_len) for _ in range(requests)]
    records = [RequestRecord(index=i, prompt_len=input_len) for i in range(requests)]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(_HTTP_TIMEOUT_S, connect=30.0)
    headers = auth_headers()  # the router's bearer token, if it requires one
    verify = client_verify(ca_file)
    async with httpx.AsyncClient(
        timeout=timeout, limits=limits, headers=headers, verify=verify
    ) as client:
        model = model or await _default_model(client, url)
        resolved_model = model
        semaphore = asyncio.Semaphore(concurrency)
        bar = _ProgressBar(requests, enabled=progress)

        async def limited(i: int, run_start_s: float) -> None:
            wait_s = run_start_s + arrivals_s[i] - time.perf_counter()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            async with semaphore:
                await _one_request(
                    client, url, resolved_model, prompts[i], output_len, records[i], run_start_s
                )
            bar.advance()

        with bar:
            run_start_s = time.perf_counter()
            await asyncio.gather(*(limited(i, run_start_s) for i in range(requests)))
            duration_s = time.perf_counter() - run_start_s
    return LoadResult(
        url=url,
        model=model,
        requests=requests,
        concurrency=concurrency,
        input_len=input_len,
        output_len=output_len,
        seed=seed,
        records=records,
        summary=summarize(records, duration_s),
        request_rate=request_rate,
    )


class _ProgressBar:
    """A rich progress bar, or nothing when disabled or stderr is not a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._progress: Any = None
        self._task: Any = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("requests"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._task = self._progress.add_task("load", total=total)

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def __enter__(self) -> _ProgressBar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


# -- CLI -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``tokentrace load``'s options to ``parser``."""
    parser.add_argument("--url", required=True, help="router (or worker) base URL")
    parser.add_argument("--requests", type=int, default=100, help="requests to send")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    parser.add_argument("--input-len", type=int, default=128, help="prompt length in tokens")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens per request")
    parser.add_argument("--model", default=None, help="default: first id of GET /v1/models")
    parser.add_argument(
        "--request-rate",
        type=float,
        default=None,
        metavar="RPS",
        help="start requests at seeded Poisson arrivals of this rate (default: as soon as "
        "a concurrency slot is free)",
    )
    parser.add_argument("--seed", type=int, default=0, help="prompt and arrival RNG seed")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="write per-request records and the summary here",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--ca-cert", type=Path, default=None, metavar="PEM", help=CA_CERT_HELP)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_summary(result: LoadResult) -> None:
    """Print the summary table to stdout."""
    from rich.console import Console
    from rich.table import Table

    s = result.summary
    table = Table(title=f"tokentrace load — {result.model} @ {result.url}")
    table.add_column("metric")
    for col in ("mean ms", "p50 ms", "p90 ms", "p99 ms"):
        table.add_column(col, justify="right")
    for name, stats in (("TTFT", s.ttft), ("TPOT", s.tpot), ("ITL", s.itl), ("E2E", s.e2e)):
        table.add_row(
            name, _ms(stats.mean_ms), _ms(stats.p50_ms), _ms(stats.p90_ms), _ms(stats.p99_ms)
        )
    console = Console()
    console.print(table)
    console.print(
        f"successful requests: {s.completed}   failed requests: {s.failed}   "
        f"duration: {s.duration_s:.2f} s\n"
        f"output tokens: {s.total_output_tokens}   "
        f"output token throughput: {s.output_throughput_tok_s:.1f} tok/s   "
        f"request throughput: {s.request_throughput_rps:.2f} req/s"
    )
    errors = [r.error for r in result.records if r.error]
    if errors:
        console.print(f"first error: {errors[0]}", style="red")


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``tokentrace load``; 0 when every request succeeded, 1 otherwise."""
    ca_file = resolve_ca_cert(getattr(args, "ca_cert", None))
    try:
        result = asyncio.run(
            run_load(
                args.url,
                args.requests,
                args.concurrency,
                args.input_len,
                args.output_len,
                model=args.model,
                seed=args.seed,
                progress=not getattr(args, "no_progress", False),
                ca_file=ca_file,
                request_rate=getattr(args, "request_rate", None),
            )
        )
    except (ValueError, RuntimeError, httpx.HTTPError) as exc:
        failure = certificate_error(exc)
        if failure is not None:
            against = f"CA file {str(ca_file)!r}" if ca_file else "the system's CAs"
            print(
                f"tokentrace load: {args.url} serves a certificate that does not verify "
                f"against {against} ({failure.verify_message}); give its CA with --ca-cert "
                f"or {CA_CERT_ENV}",
                file=sys.stderr,
            )
        else:
            print(f"tokentrace load: {exc}", file=sys.stderr)
        return 2
    print_summary(result)
    if args.json is not None:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_json(), indent=2))
    return 0 if result.summary.failed == 0 else 1
