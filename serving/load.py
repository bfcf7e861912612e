"""``tokentrace load``: a streaming OpenAI completions (or chat) load generator.

Each request is measured as vLLM's ``vllm bench serve`` measures it (its request
functions, which AIPerf and guidellm agree with): with ``time.perf_counter()`` from just
before the request is sent, every chunk with non-empty ``choices`` is an emission, its
text empty or not (for chat, the role chunk too); TTFT = first emission − start,
ITL = gaps between successive emissions, E2E = the last emission − start, output tokens
from the usage chunk, TPOT = (E2E − TTFT) / (output tokens − 1) when there is more than
one output token. Each request carries its own ``X-Request-Id``.
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
import contextlib
import gc
import json
import random
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tokentrace.runtime.auth import auth_headers
from tokentrace.runtime.tls import (
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


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """No full garbage collection while requests are timed. A client process that has
    imported much (vLLM's benchmark client imports all of vLLM: about 400,000 objects,
    a full collection takes 160 ms here) would otherwise stop its event loop for that
    long at a moment allocation happens to pick, and every request in flight would
    measure the pause as latency. Everything alive now is frozen out of collection (as
    vLLM's engine does after start-up) and collected normally again afterwards."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class StreamTimeline:
    """Emission times of one streamed response: ``time.perf_counter()`` seconds as
    given. Pure; fed one chunk with choices at a time."""

    def __init__(self, start_s: float) -> None:
        self.start_s = start_s
        self.emission_times_s: list[float] = []  # every chunk with choices
        self.text = ""

    def add_chunk(self, t_s: float, text: str) -> None:
        self.emission_times_s.append(t_s)
        self.text += text

    @property
    def ttft_s(self) -> float | None:
        return self.emission_times_s[0] - self.start_s if self.emission_times_s else None

    @property
    def itl_s(self) -> list[float]:
        t = self.emission_times_s
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    def e2e_s(self, end_s: float) -> float:
        """Start → the last emission (vLLM's latency); ``end_s`` if there was none."""
        last = self.emission_times_s[-1] if self.emission_times_s else end_s
        return last - self.start_s


def tpot_s(e2e_s: float, ttft_s: float | None, output_tokens: int | None) -> float | None:
    """(E2E − TTFT) / (output tokens − 1); None unless there are 2+ output tokens."""
    if ttft_s is None or output_tokens is None or output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


@dataclass
class RequestRecord:
    """One request's outcome. Times in seconds; ``chunk_times_s`` are the emissions'
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
        self.chunk_times_s = [t - timeline.start_s for t in timeline.emission_times_s]
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
    endpoint: str = "completions"  # or "chat"

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


ENDPOINTS = ("completions", "chat")


def request_body(endpoint: str, model: str, prompt: str, output_len: int) -> dict[str, Any]:
    """A streaming request as vLLM's benchmark client sends it (the chat message as a
    list of text parts, ``max_completion_tokens`` for chat), always with the usage
    chunk and ``ignore_eos`` so every request runs to ``output_len`` tokens."""
    if endpoint == "chat":
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
            "max_completion_tokens": output_len,
        }
    else:
        body = {"model": model, "prompt": prompt, "max_tokens": output_len}
    body.update({"stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}})
    return body


async def _one_request(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    record: RequestRecord,
    run_start_s: float,
    endpoint: str,
    request_id: str,
) -> None:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    start_s = time.perf_counter()
    record.start_s = start_s - run_start_s
    timeline = StreamTimeline(start_s)
    try:
        async with client.stream(
            "POST", f"{url}{path}", json=body, headers={"x-request-id": request_id}
        ) as resp:
            record.request_id = resp.headers.get("x-request-id") or request_id
            if resp.status_code >= 400:
                text = (await resp.aread()).decode("utf-8", "replace")
                record.error = f"HTTP {resp.status_code}: {text[:500]}"
                return
            kind = resp.headers.get("content-type", "")
            if not kind.startswith("text/event-stream"):
                await resp.aread()
                record.error = (
                    f"{url}{path} answered a streaming request with {kind or 'no content type'}"
                    ", not a stream (text/event-stream)"
                )
                return
            async for line in P.sse_lines(resp.aiter_bytes()):
                event = P.parse_sse_data(line)
                if event is None or event == P.DONE:
                    continue
                now_s = time.perf_counter()
                if "error" in event:
                    error = event["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    record.error = f"stream error: {message}"
                    continue
                if event.get("choices"):
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
    if record.error is None and not timeline.emission_times_s:
        record.error = "the stream carried no chunk with choices"
    if record.output_tokens is None:
        # No usage chunk: count the text's characters (one token each for a byte-level
        # tokenizer; vLLM's client re-tokenizes the text instead).
        record.output_tokens = len(timeline.text)
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
    endpoint: str = "completions",
    request_id_prefix: str | None = None,
    warmup: bool = False,
) -> LoadResult:
    """Send ``requests`` streaming completions (``endpoint="chat"``: chat completions)
    with at most ``concurrency`` in flight and measure each; with ``request_rate``,
    request ``i`` starts no earlier than its seeded Poisson arrival
    (:func:`arrival_offsets_s`). Request ``i`` carries ``X-Request-Id:
    <request_id_prefix>-<i>`` (a fresh prefix per run by default). An ``https://``
    server is verified against ``ca_file`` (else the system's CAs). With ``warmup``,
    ``concurrency`` unmeasured 2-token requests go first (ids ``<prefix>-warmup-<i>``),
    so the measured ones run on open connections, as all but the first few of a long
    benchmark do. Request failures are recorded, never raised; raises only when the
    model cannot be resolved from ``{url}/v1/models`` (ValueError also for an unusable
    ``ca_file``, rate or endpoint)."""
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}")
    prefix = request_id_prefix or f"tt-load-{uuid.uuid4().hex[:12]}"
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
                body = request_body(endpoint, resolved_model, prompts[i], output_len)
                await _one_request(
                    client, url, body, records[i], run_start_s, endpoint, f"{prefix}-{i}"
                )
            bar.advance()

        if warmup:
            await asyncio.gather(
                *(
                    _one_request(
                        client,
                        url,
                        request_body(endpoint, resolved_model, prompts[i % requests], 2),
                        RequestRecord(index=i, prompt_len=input_len),
                        time.perf_counter(),
                        endpoint,
                        f"{prefix}-warmup-{i}",
                    )
                    for i in range(concurrency)
                )
            )
        with bar, frozen_gc():
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
        endpoint=endpoint,
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


def add_workload_arguments(
    parser: argparse.ArgumentParser, *, requests: int, input_len: int, output_len: int
) -> None:
    """The workload options ``load`` and ``verify`` share (with their own defaults):
    endpoint, request count, concurrency, prompt and output lengths, model."""
    parser.add_argument(
        "--endpoint",
        choices=ENDPOINTS,
        default="completions",
        help="/v1/completions or /v1/chat/completions (default: %(default)s)",
    )
    parser.add_argument(
        "--requests", type=int, default=requests, help="requests to send (default: %(default)s)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight at most (default: 8)"
    )
    parser.add_argument(
        "--input-len", type=int, default=input_len, help="prompt tokens (default: %(default)s)"
    )
    parser.add_argument(
        "--output-len",
        type=int,
        default=output_len,
        help="output tokens per request (default: %(default)s)",
    )
    parser.add_argument("--model", default=None, help="default: first id of GET /v1/models")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``tokentrace load``'s options to ``parser``."""
    parser.add_argument("--url", required=True, help="router (or worker) base URL")
    add_workload_arguments(parser, requests=100, input_len=128, output_len=64)
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
    table = Table(title=f"tokentrace load — {result.model} @ {result.url} ({result.endpoint})")
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
                endpoint=getattr(args, "endpoint", "completions"),
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
