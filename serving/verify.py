"""``tokentrace verify``: does the stored telemetry agree with what a client measured?

It drives a workload against any OpenAI-compatible endpoint as a client would, each
request with its own ``X-Request-Id``: tokentrace's own client
(:mod:`tokentrace.serving.load`, which measures exactly as vLLM's ``bench serve`` does:
every chunk with ``choices`` is an emission), or with ``--client vllm`` vLLM's own
benchmark request functions (``vllm.benchmarks``, where vLLM is installed). It waits
until the collector has stored every request's rows; then compares, request by
request:

- **counts**: the client's inter-token gaps against the stored emissions' gaps
  (``token_latencies`` rows with an ``itl_s``), its output tokens (the usage chunk)
  against ``requests.output_tokens``;
- **times**: |client − stored| for TTFT (``requests.ttft_s``), each gap (paired in order,
  when the counts agree), TPOT and E2E.

Behind tokentrace's router the stored request is its ``requests`` row (the router's
client-visible TTFT and E2E); sent straight to a traced server, it is that server's
``llm.decode`` span (arrival at the server → its first and last emission). Which one is
decided before comparing, never per request (``--stored``; by default from the
endpoint's ``GET /health``: tokentrace's router says ``"role": "router"``): a decode
span is exported before its router's span, so "whichever is there" would compare
some requests against the decode server's TTFT, which leaves out prefill.

The client's TTFT and E2E also hold the network between it and the endpoint (the
stored ones start when the request arrives), so on a remote client they differ by
about a round trip; gaps do not.

Exit status: 0 when every count agrees and every median |client − stored| is within its
limit, 1 when not, 2 when it could not run (endpoint unreachable, not a stream, a
model it does not serve, no collector).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tokentrace.runtime.auth import auth_headers
from tokentrace.runtime.tls import CA_CERT_HELP, client_verify, resolve_ca_cert
from tokentrace.serving import load as L

__all__ = [
    "CLIENTS",
    "METRICS",
    "SOURCES",
    "MetricAgreement",
    "Stored",
    "VerifyFailed",
    "add_arguments",
    "compare",
    "run_from_args",
    "stored_rows",
    "stored_source",
]

#: The metrics compared, with their default limit on the median |client − stored| (ms):
#: past these the telemetry is wrong, not the client or the network. A client that
#: shares its host with the engines, or crosses a network, sees TTFT and E2E later by
#: its own event loop's delay and a round trip; gaps hold neither, only the client's
#: per-chunk cost (bench.agreement measures 0.1–0.4 ms on a quiet 2-core host).
METRICS = {"TTFT": 5.0, "ITL": 1.0, "TPOT": 1.0, "E2E": 5.0}
#: Who plays the client: tokentrace's own, or vLLM's benchmark request functions.
CLIENTS = ("tokentrace", "vllm")
#: Where a request's stored numbers come from: the router's ``requests`` row, or the
#: traced server's ``llm.decode`` span.
SOURCES = ("requests", "decode")
_BATCH = 200  # request ids per query


class VerifyFailed(Exception):
    """It could not run; the message is the one line to print."""


@dataclass
class Stored:
    """One request's stored numbers (seconds; gaps in emission order)."""

    trace_id: str
    ttft_s: float | None
    e2e_s: float | None
    tpot_s: float | None
    output_tokens: int | None
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0  # the token rows' total


@dataclass
class MetricAgreement:
    """One metric over the compared requests: how many, how many disagree in count, and
    the median and p99 of |client − stored| in ms (None over no pairs)."""

    metric: str
    requests: int
    count_mismatches: int
    median_ms: float | None
    p99_ms: float | None
    limit_ms: float | None

    @property
    def ok(self) -> bool:
        within = self.limit_ms is None or self.median_ms is None or self.median_ms <= self.limit_ms
        return self.count_mismatches == 0 and within


def _stats(diffs: Sequence[float]) -> tuple[float | None, float | None]:
    if not diffs:
        return None, None
    ms = np.abs(np.asarray(diffs, dtype=float)) * 1000.0
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def compare(
    records: Sequence[L.RequestRecord],
    stored: dict[str, Stored],
    limits_ms: dict[str, float] | None = None,
) -> list[MetricAgreement]:
    """Per metric, client against stored, over the requests the client completed. A
    request with no stored row is a count mismatch of every metric. Pure."""
    limits = {**METRICS, **(limits_ms or {})}
    diffs: dict[str, list[float]] = {m: [] for m in (*METRICS, "output tokens")}
    mismatches = dict.fromkeys(diffs, 0)
    compared = dict.fromkeys(diffs, 0)
    for record in records:
        if not record.success or record.request_id is None:
            continue
        row = stored.get(record.request_id)
        for metric in diffs:
            compared[metric] += 1
        if row is None:
            for metric in diffs:
                mismatches[metric] += 1
            continue
        if record.output_tokens != row.output_tokens:
            mismatches["output tokens"] += 1
        if len(record.itl_s) != len(row.gaps_s):
            mismatches["ITL"] += 1
        else:
            diffs["ITL"] += [c - s for c, s in zip(record.itl_s, row.gaps_s, strict=True)]
        for metric, client, kept in (
            ("TTFT", record.ttft_s, row.ttft_s),
            ("TPOT", record.tpot_s, row.tpot_s),
            ("E2E", record.e2e_s, row.e2e_s),
        ):
            if (client is None) != (kept is None):
                mismatches[metric] += 1
            elif client is not None and kept is not None:
                diffs[metric].append(client - kept)
    out = []
    for metric, values in diffs.items():
        median, p99 = _stats(values)
        out.append(
            MetricAgreement(
                metric, compared[metric], mismatches[metric], median, p99, limits.get(metric)
            )
        )
    return out


# -- reading the stored rows ---------------------------------------------------------


def _query(
    client: httpx.Client, api: str, sql: str, params: dict[str, Any]
) -> list[dict[str, Any]]:
    resp = client.post(f"{api}/query", json={"sql": sql, "params": params})
    if resp.status_code != 200:
        raise VerifyFailed(f"the collector at {api} refused a query: {resp.text[:300]}")
    body = resp.json()
    return [dict(zip(body["columns"], row, strict=True)) for row in body["rows"]]


def stored_rows(
    client: httpx.Client, api: str, request_ids: Sequence[str], source: str
) -> dict[str, Stored]:
    """What the collector at ``api`` holds for these request ids (those it has), from
    ``source``: the ``requests`` rows of tokentrace's router, or (``"decode"``, sent
    straight to a traced server) its ``llm.decode`` spans, arrival at the server → its
    first and last emission."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    out: dict[str, Stored] = {}
    for i in range(0, len(request_ids), _BATCH):
        ids = list(request_ids[i : i + _BATCH])
        if source == "requests":
            for row in _query(
                client,
                api,
                "SELECT request_id, trace_id, ttft_s, e2e_s, tpot_s, output_tokens "
                "FROM tokentrace.requests WHERE request_id IN {ids:Array(String)}",
                {"ids": ids},
            ):
                out[row["request_id"]] = Stored(
                    row["trace_id"],
                    row["ttft_s"],
                    row["e2e_s"],
                    row["tpot_s"],
                    row["output_tokens"],
                )
            continue
        for row in _query(
            client,
            api,
            "SELECT SpanAttributes['tokentrace.request.id'] AS request_id, TraceId AS trace_id, "
            "Duration / 1e9 AS e2e_s, "
            "toFloat64OrNull(SpanAttributes['gen_ai.server.time_to_first_token']) AS ttft_s, "
            "toUInt32OrNull(SpanAttributes['gen_ai.usage.output_tokens']) AS output_tokens "
            "FROM tokentrace.otel_traces WHERE SpanName = 'llm.decode' "
            "AND SpanAttributes['tokentrace.request.id'] IN {ids:Array(String)}",
            {"ids": ids},
        ):
            ttft, e2e, n = row["ttft_s"], row["e2e_s"], row["output_tokens"]
            tpot = (e2e - ttft) / (n - 1) if ttft is not None and n is not None and n > 1 else None
            out[row["request_id"]] = Stored(row["trace_id"], ttft, e2e, tpot, n)
    by_trace = {s.trace_id: s for s in out.values()}
    traces = list(by_trace)
    for i in range(0, len(traces), _BATCH):
        for row in _query(
            client,
            api,
            "SELECT trace_id, arraySort(x -> x.1, groupArray((toUnixTimestamp64Nano(ts), "
            "ifNull(itl_s, -1), tokens))) AS emissions FROM tokentrace.token_latencies "
            "WHERE trace_id IN {t:Array(String)} GROUP BY trace_id",
            {"t": traces[i : i + _BATCH]},
        ):
            s = by_trace[row["trace_id"]]
            s.gaps_s = [float(itl) for _, itl, _ in row["emissions"] if itl >= 0]
            s.tokens = sum(int(n) for _, _, n in row["emissions"])
    return out


def _complete(row: Stored | None) -> bool:
    return (
        row is not None
        and row.e2e_s is not None
        and row.output_tokens is not None
        and row.tokens >= row.output_tokens
    )


def wait_for_rows(
    client: httpx.Client,
    api: str,
    request_ids: Sequence[str],
    timeout_s: float,
    *,
    source: str,
) -> dict[str, Stored]:
    """Poll until every request's rows are all there (its row from ``source``, and
    token rows holding all its output tokens) or ``timeout_s`` passes; returns what is
    there."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = stored_rows(client, api, request_ids, source)
        if all(_complete(rows.get(r)) for r in request_ids) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


# -- vLLM's own client ---------------------------------------------------------------


async def drive_vllm(
    url: str,
    endpoint: str,
    requests: int,
    concurrency: int,
    input_len: int,
    output_len: int,
    model: str,
    seed: int = 0,
    request_id_prefix: str = "tt-verify",
    warmup: bool = True,
) -> list[L.RequestRecord]:
    """The same workload as :func:`tokentrace.serving.load.run_load` (its seeded
    prompts), sent and measured by vLLM's ``bench serve`` request functions: what they
    report per request, as records. Needs vLLM (``vllm.benchmarks``) and aiohttp.

    With ``warmup``, ``concurrency`` unmeasured requests go first, so the measured ones
    run on open connections, as all but the first few of a long benchmark do (a new
    connection's setup is in the client's TTFT and before the server's arrival)."""
    import random

    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import (
        RequestFuncInput,
        async_request_openai_chat_completions,
        async_request_openai_completions,
    )

    if endpoint not in L.ENDPOINTS:
        raise ValueError(f"endpoint must be one of {L.ENDPOINTS}, got {endpoint!r}")
    send = (
        async_request_openai_chat_completions
        if endpoint == "chat"
        else (async_request_openai_completions)
    )
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    rng = random.Random(seed)
    prompts = [L.make_prompt(rng, input_len) for _ in range(requests)]
    records = [
        L.RequestRecord(index=i, prompt_len=input_len, request_id=f"{request_id_prefix}-{i}")
        for i in range(requests)
    ]
    headers = auth_headers() or None
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=6 * 60 * 60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        def job(i: int, request_id: str | None, tokens: int) -> Any:
            return RequestFuncInput(
                prompt=prompts[i],
                api_url=f"{url}{path}",
                prompt_len=input_len,
                output_len=tokens,
                model=model,
                ignore_eos=True,
                request_id=request_id,
                extra_headers=headers,
            )

        if warmup:
            await asyncio.gather(
                *(
                    send(job(i % requests, f"{request_id_prefix}-warmup-{i}", 2), session=session)
                    for i in range(concurrency)
                )
            )

        async def one(i: int) -> None:
            async with gate:
                out = await send(job(i, records[i].request_id, output_len), session=session)
            record = records[i]
            if not out.success:
                record.error = out.error or "vLLM's client reported a failure"
                return
            record.ttft_s = out.ttft
            record.itl_s = list(out.itl)
            record.e2e_s = out.latency
            record.output_tokens = out.output_tokens
            record.tpot_s = L.tpot_s(out.latency, out.ttft, out.output_tokens)

        with L.frozen_gc():
            await asyncio.gather(*(one(i) for i in range(requests)))
    return records


# -- the command ---------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="the endpoint's base URL (router or server)")
    L.add_workload_arguments(parser, requests=32, input_len=64, output_len=32)
    parser.add_argument("--seed", type=int, default=0, help="prompt RNG seed (default: 0)")
    parser.add_argument(
        "--client",
        choices=CLIENTS,
        default="tokentrace",
        help="who sends and measures the requests: tokentrace's own client, or vLLM's "
        "bench serve request functions (needs vLLM installed) (default: %(default)s)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--collector",
        default=None,
        metavar="URL",
        help="the collector's API (its --http address), e.g. http://127.0.0.1:4320",
    )
    where.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="find the collector running on this data directory (default: "
        "$TOKENTRACE_DATA_DIR, else ~/.local/share/tokentrace)",
    )
    parser.add_argument(
        "--stored",
        choices=("auto", *SOURCES),
        default="auto",
        help="compare with the requests rows of tokentrace's router, or with the traced "
        "server's llm.decode spans (arrival at the server; no prefill in its TTFT); auto: "
        "requests when --url is tokentrace's router (default: %(default)s)",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the rows (default: %(default)s)",
    )
    for metric, limit in METRICS.items():
        parser.add_argument(
            f"--max-{metric.lower()}-ms",
            type=float,
            default=limit,
            metavar="MS",
            help=f"limit on the median |client − stored| {metric} (default: %(default)s)",
        )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="write the comparison here"
    )
    parser.add_argument("--ca-cert", type=Path, default=None, metavar="PEM", help=CA_CERT_HELP)


def _collector_api(args: argparse.Namespace) -> str:
    if args.collector:
        return str(args.collector).rstrip("/")
    from tokentrace.runtime.layout import collector_file, default_data_dir

    path = collector_file(args.data_dir or default_data_dir())
    try:
        info = json.loads(path.read_text())
        return str(info.get("http_url") or f"http://{info['http']}")
    except (OSError, ValueError, KeyError) as exc:
        raise VerifyFailed(
            f"no running collector found ({path}: {exc}); give its API with --collector URL"
        ) from None


def _preflight(url: str, model: str | None, verify: Any) -> list[str]:
    """The models ``url`` serves; VerifyFailed when it cannot be reached or does not
    serve ``model``."""
    try:
        resp = httpx.get(f"{url}/v1/models", headers=auth_headers(), timeout=10, verify=verify)
    except httpx.HTTPError as exc:
        raise VerifyFailed(f"cannot reach {url}: {exc}") from None
    if resp.status_code != 200:
        raise VerifyFailed(f"{url}/v1/models answered {resp.status_code}: {resp.text[:200]}")
    try:
        served = [str(m["id"]) for m in resp.json().get("data") or []]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise VerifyFailed(f"{url}/v1/models did not list models") from None
    if not served:
        raise VerifyFailed(f"{url}/v1/models lists no model")
    if model is not None and model not in served:
        raise VerifyFailed(
            f"{url} does not serve the model {model!r} (it serves: {', '.join(served) or 'none'})"
        )
    return served


def stored_source(url: str, verify: Any) -> str:
    """``"requests"`` when ``url`` is tokentrace's router (its ``GET /health`` says
    ``"role": "router"``): only it writes ``requests`` rows. Else ``"decode"``."""
    try:
        resp = httpx.get(f"{url}/health", headers=auth_headers(), timeout=10, verify=verify)
        body = resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        body = None
    return "requests" if isinstance(body, dict) and body.get("role") == "router" else "decode"


def run(args: argparse.Namespace) -> tuple[L.LoadResult, list[MetricAgreement], str]:
    """Drive the load, wait for the rows, compare: the load, the comparison and where
    the stored numbers came from (a SOURCES entry). Raises VerifyFailed when it cannot."""
    url = args.url.rstrip("/")
    ca_file = resolve_ca_cert(args.ca_cert)
    verify = client_verify(ca_file)
    api = _collector_api(args)
    try:
        health = httpx.get(f"{api}/health", timeout=10, verify=verify)
    except httpx.HTTPError as exc:
        raise VerifyFailed(f"cannot reach the collector at {api}: {exc}") from None
    if health.status_code != 200:
        raise VerifyFailed(f"the collector at {api} answered /health with {health.status_code}")
    served = _preflight(url, args.model, verify)
    source = args.stored if args.stored != "auto" else stored_source(url, verify)
    if args.client == "vllm":
        try:
            import vllm.benchmarks.lib.endpoint_request_func  # noqa: F401
        except ImportError as exc:
            raise VerifyFailed(f"--client vllm needs vLLM installed here ({exc})") from None
        began = time.perf_counter()
        records = asyncio.run(
            drive_vllm(
                url,
                args.endpoint,
                args.requests,
                args.concurrency,
                args.input_len,
                args.output_len,
                args.model or served[0],
                args.seed,
                request_id_prefix=f"tt-verify-{os.urandom(6).hex()}",
            )
        )
        result = L.LoadResult(
            url=url,
            model=args.model or served[0],
            requests=args.requests,
            concurrency=args.concurrency,
            input_len=args.input_len,
            output_len=args.output_len,
            seed=args.seed,
            records=records,
            summary=L.summarize(records, time.perf_counter() - began),
            endpoint=args.endpoint,
        )
    else:
        result = asyncio.run(
            L.run_load(
                url,
                args.requests,
                args.concurrency,
                args.input_len,
                args.output_len,
                model=args.model,
                seed=args.seed,
                ca_file=ca_file,
                endpoint=args.endpoint,
                progress=False,
                warmup=True,
            )
        )
    ok = [r for r in result.records if r.success and r.request_id]
    if not ok:
        first = next((r.error for r in result.records if r.error), "no request completed")
        raise VerifyFailed(f"no request succeeded: {first}")
    with httpx.Client(headers=auth_headers(), timeout=60, verify=verify) as client:
        ids = [r.request_id for r in ok if r.request_id]
        rows = wait_for_rows(client, api, ids, args.wait, source=source)
    limits = {m: getattr(args, f"max_{m.lower()}_ms") for m in METRICS}
    return result, compare(result.records, rows, limits), source


def verdict(agreement: Sequence[MetricAgreement], failed_requests: int = 0) -> str:
    """The report's last line: what agreed, or each thing that did not. Pure."""
    problems = [
        f"{a.metric}: {a.count_mismatches} of {a.requests} requests differ in count"
        for a in agreement
        if a.count_mismatches
    ]
    problems += [
        f"{a.metric}: median |Δ| {a.median_ms:.3f} ms > {a.limit_ms:g} ms"
        for a in agreement
        if a.limit_ms is not None and a.median_ms is not None and a.median_ms > a.limit_ms
    ]
    if failed_requests:
        problems.append(f"{failed_requests} requests failed")
    if not problems:
        return "agreed: every count equal, every median within its limit"
    return "disagreed: " + "; ".join(problems)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def print_report(result: L.LoadResult, agreement: list[MetricAgreement], source: str) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result.summary
    table = Table(
        title=f"client vs stored — {result.summary.completed} requests to {result.url} "
        f"({result.endpoint}, concurrency {result.concurrency}; stored: "
        + ("the router's requests rows)" if source == "requests" else "llm.decode spans)"),
        title_justify="left",
    )
    for col in ("metric", "requests", "count mismatches", "median |Δ| ms", "p99 |Δ| ms", "limit"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for a in agreement:
        table.add_row(
            a.metric,
            str(a.requests),
            str(a.count_mismatches),
            _fmt(a.median_ms),
            _fmt(a.p99_ms),
            "—" if a.limit_ms is None else f"≤ {a.limit_ms:g} ms",
            style=None if a.ok else "bold red",
        )
    console = Console()
    console.print(table)
    console.print(
        f"client-measured p50: TTFT {_fmt(s.ttft.p50_ms)} ms, ITL {_fmt(s.itl.p50_ms)} ms, "
        f"TPOT {_fmt(s.tpot.p50_ms)} ms, E2E {_fmt(s.e2e.p50_ms)} ms"
        + (f"; {s.failed} requests failed" if s.failed else "")
    )
    console.print(verdict(agreement, s.failed), highlight=False)


def run_from_args(args: argparse.Namespace) -> int:
    try:
        result, agreement, source = run(args)
    except VerifyFailed as exc:
        print(f"tokentrace verify: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"tokentrace verify: {exc}", file=sys.stderr)
        return 2
    print_report(result, agreement, source)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "load": result.to_json(),
                    "stored": source,
                    "agreement": [asdict(a) for a in agreement],
                },
                indent=2,
            )
        )
    failed = result.summary.failed > 0
    return 0 if all(a.ok for a in agreement) and not failed else 1
