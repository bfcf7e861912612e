"""Agreement: vLLM's own benchmark client against the rows tokentrace stored.

Starts the reference P/D stack (collector, router, one prefill and two decode workers,
as ``make demo`` does), then per concurrency (1, 8, 32) and endpoint (completions,
chat) drives requests with vLLM's ``bench serve`` request functions
(:func:`tokentrace.serving.verify.drive_vllm`) and compares what that client measured
with what tokentrace stored for the same requests (``tokentrace verify``'s
comparison): count mismatches (gaps, output tokens), and the median and p99 of
|client − stored| TTFT and ITL. Each figure's baseline is the client's own p50 of the
same metric in the same run: the size of what is being measured.

Targets (issue 14): 0 count mismatches everywhere; median |Δ| TTFT ≤ 1 ms and ITL ≤
0.5 ms, p99 ≤ 5 ms, at concurrency 1 and 8. At 32 it reports what it gets.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import httpx
import numpy as np

from bench._common import Figure, add_common_args, emit
from tokentrace.serving.stack import LocalStack
from tokentrace.serving.verify import compare, drive_vllm, wait_for_rows

__all__ = ["build_parser", "main", "run"]

TITLE = "agreement: vLLM's bench serve client vs the stored rows"
MODEL = "tt-tiny"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.agreement",
        description=(
            "Start the reference P/D stack; per concurrency and endpoint, send requests "
            "with vLLM's bench serve request functions and compare what they measured "
            "with the stored rows: count mismatches and median/p99 |client - stored| "
            "TTFT and ITL, each next to the client's own p50."
        ),
    )
    parser.add_argument("--concurrencies", default="1,8,32", help="default 1,8,32")
    parser.add_argument("--endpoints", default="completions,chat", help="default both")
    parser.add_argument(
        "--requests", type=int, default=64, help="requests per concurrency (default 64)"
    )
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--output-len", type=int, default=32, help="output tokens (default 32)")
    add_common_args(parser)
    return parser


def _p50_ms(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, 50)) if values else float("nan")


def _figures(
    stack: LocalStack, endpoint: str, concurrency: int, args: argparse.Namespace
) -> list[Figure]:
    records = asyncio.run(
        drive_vllm(
            stack.router_url,
            endpoint,
            max(args.requests, concurrency),
            concurrency,
            args.input_len,
            args.output_len,
            MODEL,
            seed=concurrency,
            request_id_prefix=f"agreement-{endpoint}-{concurrency}",
        )
    )
    failed = [r.error for r in records if not r.success]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, first: {failed[0]}")
    ids = [r.request_id for r in records if r.request_id]
    with httpx.Client(timeout=60) as client:
        rows = wait_for_rows(client, stack.collector_http, ids, 120, source="requests")
    by_metric = {a.metric: a for a in compare(records, rows)}
    strict = concurrency <= 8
    label = f"{endpoint} c={concurrency}"
    mismatches = sum(a.count_mismatches for a in by_metric.values())
    out = [
        Figure(
            f"{label}: count mismatches (gaps, tokens)",
            float(mismatches),
            "requests",
            float(len(records)),
            "0",
            mismatches == 0,
            "requests compared",
        )
    ]
    client_p50 = {
        "TTFT": _p50_ms([r.ttft_s for r in records if r.ttft_s is not None]),
        "ITL": _p50_ms([g for r in records for g in r.itl_s]),
    }
    for metric, median_target in (("TTFT", 1.0), ("ITL", 0.5)):
        a = by_metric[metric]
        for stat, value, target in (
            ("median", a.median_ms, median_target),
            ("p99", a.p99_ms, 5.0),
        ):
            out.append(
                Figure(
                    f"{label}: {stat} |client - stored| {metric}",
                    float("nan") if value is None else value,
                    "ms",
                    client_p50[metric],
                    f"<= {target:g} ms" if strict else "reported",
                    (value is not None and value <= target) if strict else None,
                    f"client {metric} p50",
                )
            )
    return out


def run(args: argparse.Namespace) -> list[Figure]:
    concurrencies = [int(c) for c in args.concurrencies.split(",")]
    endpoints = [e.strip() for e in args.endpoints.split(",")]
    with tempfile.TemporaryDirectory(prefix="tt-agreement-") as tmp:
        stack = LocalStack(Path(tmp), prefill_workers=1, decode_workers=2, worker_nice=19)
        stack.start()
        try:
            return [
                f
                for endpoint in endpoints
                for concurrency in concurrencies
                for f in _figures(stack, endpoint, concurrency, args)
            ]
        finally:
            stack.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    emit(TITLE, run(args), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
