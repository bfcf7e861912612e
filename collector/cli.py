"""The collector's commands: ``tokentrace collector`` here, and the reading commands
(``query``, ``report``, ``trace``, ``traces``, ``ui``) registered here and run by
:mod:`.query.commands`.

Registration imports nothing heavy; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tokentrace.schemas.ddl import QUERY_USER

from .query import commands
from .query.reports import REPORTS

__all__ = ["register"]

_DATA_DIR_HELP = (
    "tokentrace's data directory (default: $TOKENTRACE_DATA_DIR, else "
    "$XDG_DATA_HOME/tokentrace, i.e. ~/.local/share/tokentrace); the embedded ClickHouse "
    "store lives in DATA_DIR/clickhouse and a running collector writes DATA_DIR/collector.json"
)
_CLICKHOUSE_HELP = "ClickHouse DSN instead of the embedded store: chdb:///path or http://host:8123"


def register(subparsers: Any) -> None:
    """Add the ``collector`` and ``query`` subcommands to the root parser's subparsers."""
    p = subparsers.add_parser(
        "collector",
        help="receive OTLP spans, store them and derived latency rows in ClickHouse",
        description=(
            "Receive OTLP traces over gRPC and HTTP, store the raw spans (otel_traces) and "
            "the derived request, token-latency and KV-transfer rows in ClickHouse, and "
            "serve a read-only query API. Port 0 picks a free port. Once listening it "
            "writes DATA_DIR/collector.json and prints one 'tokentrace collector ready' "
            "line. An export is acknowledged once it is fsynced to the write-ahead log "
            "(DATA_DIR/wal); what the log holds is inserted into ClickHouse in blocks of "
            "up to a second, also after a crash or restart, exactly once, and a read "
            "through the API sees every export acknowledged before it. SIGINT/SIGTERM stop it "
            "after everything accepted is stored or logged. With "
            "--forward-otlp it also sends every accepted span to other OTLP endpoints "
            "(e.g. Jaeger), each from its own cursor over the write-ahead log: ClickHouse "
            "and every target get every span at their own pace. With --tls-cert and "
            "--tls-key all three ports serve TLS (https://) and no plaintext."
        ),
    )
    _add_store_args(p)
    p.add_argument(
        "--otlp-grpc",
        default="127.0.0.1:4317",
        metavar="HOST:PORT",
        help="OTLP/gRPC listen address (default: %(default)s)",
    )
    p.add_argument(
        "--otlp-http",
        default="127.0.0.1:4318",
        metavar="HOST:PORT",
        help="OTLP/HTTP listen address, POST /v1/traces (default: %(default)s)",
    )
    p.add_argument(
        "--http",
        default="127.0.0.1:4320",
        metavar="HOST:PORT",
        help="collector API listen address: GET /health, GET /metrics (Prometheus), POST "
        "/query, the named reports GET /reports[/NAME], Jaeger's query API under /api/ (v1) "
        "and /api/v3/, and the latency page GET /ui (default: %(default)s)",
    )
    p.add_argument(
        "--forward-otlp",
        action="append",
        default=[],
        metavar="URL",
        help="also forward every accepted span to this OTLP endpoint; repeatable. "
        "grpc://HOST:PORT for OTLP/gRPC (insecure), http(s)://HOST:PORT for OTLP/HTTP "
        "protobuf to /v1/traces (or the URL's own path). Each target reads the "
        "write-ahead log from its own cursor: a slow or dead target is retried with "
        "exponential backoff and never delays ClickHouse; what it has not had stays in "
        "the log (also across restarts) within --wal-max-bytes, shared by all sinks. "
        "Progress is under 'forwarded' in GET /health",
    )
    p.add_argument(
        "--forward-max-backoff",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="per forward target: longest wait between retries (default: %(default)s)",
    )
    p.add_argument(
        "--forward-shutdown-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="at shutdown, how long each forward target may take to catch up with the "
        "log; what it has not had then is sent after the next start (default: "
        "%(default)s)",
    )
    p.add_argument(
        "--wal-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="write-ahead log directory, one per collector (default: DATA_DIR/wal)",
    )
    p.add_argument(
        "--wal-max-bytes",
        type=_byte_size,
        default=1 << 30,
        metavar="SIZE",
        help="disk budget for accepted spans some sink (ClickHouse or a --forward-otlp "
        "target) has not had yet, e.g. 512M or 4G; past "
        "it exports are refused with retryable errors (gRPC RESOURCE_EXHAUSTED, HTTP 429 "
        "with Retry-After) until the backlog shrinks (default: 1G)",
    )
    p.add_argument(
        "--insert-interval",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="insert what the log holds for ClickHouse once its oldest export has waited "
        "this long, as one INSERT per table: each INSERT costs ClickHouse 10-30 ms of "
        "CPU whatever its size, so longer is cheaper per span and holds more memory "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--insert-block-bytes",
        type=_byte_size,
        default=16 << 20,
        metavar="SIZE",
        help="insert sooner once the waiting log records hold this many bytes, e.g. 4M; "
        "the rows of 4 such blocks are kept decoded in memory, a backlog beyond that is "
        "read back from the log (default: 16M)",
    )
    p.add_argument(
        "--auth-token",
        default=None,
        metavar="TOKEN",
        help=(
            "require Authorization: Bearer TOKEN on every endpoint but /health "
            "(default: $TOKENTRACE_AUTH_TOKEN; unset: no authentication, which is refused "
            "on any address but loopback unless --allow-unauthenticated)"
        ),
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="listen beyond loopback without --auth-token: anyone who can reach the "
        "ports can then send spans and read every stored trace (default: refuse to start)",
    )
    _add_query_limit_args(p)
    p.add_argument(
        "--query-user",
        default=os.environ.get("TOKENTRACE_QUERY_USER"),
        metavar="NAME",
        help="with a ClickHouse server: run reads (POST /query, the Jaeger API, the "
        "latency page) as this user, password from $TOKENTRACE_QUERY_PASSWORD; give it "
        "only SELECT ON tokentrace.* (see --create-query-user) "
        "(default: $TOKENTRACE_QUERY_USER; unset: the DSN's user in readonly=2)",
    )
    p.add_argument(
        "--create-query-user",
        action="store_true",
        help=f"create (or reset) --query-user (default name {QUERY_USER}) at startup with "
        "exactly SELECT ON tokentrace.*, readonly=2 and the --query-* limits as its "
        "maximums; the DSN's user needs CREATE USER, CREATE SETTINGS PROFILE and "
        "SELECT ON tokentrace.* WITH GRANT OPTION",
    )
    _add_tls_args(p)
    p.set_defaults(func=_run_collector)

    q = subparsers.add_parser(
        "query",
        help="run a read-only SQL query against tokentrace's ClickHouse store",
        description=(
            "Run SQL against the store. With --clickhouse, query that DSN directly; "
            "otherwise ask the collector running on DATA_DIR (it owns the embedded store), "
            "or open the embedded store directly if no collector is running. Unqualified "
            "table names mean the tokentrace database."
        ),
    )
    q.add_argument("sql", metavar="SQL", help='the statement, e.g. "SELECT * FROM requests"')
    _add_store_args(q)
    q.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="output format: rich table, CSV with a header, or a JSON array of "
        "row objects (default: %(default)s)",
    )
    _add_ca_arg(q)
    q.set_defaults(func=commands.run_query)

    r = subparsers.add_parser(
        "report",
        help="the per-node report tables: TTFT, prefill, KV transfer, handoff, ITL",
        description=(
            "Print the named report queries over a time window: the tables tokentrace "
            "demo prints, the collector serves as GET /reports/NAME, the latency page "
            "draws and the Grafana dashboard's report panels show, so every surface shows "
            "the same numbers for the same store and window. Percentiles are exact, "
            "interpolated linearly between the nearest ranks (ClickHouse's "
            "quantilesExactInclusive, numpy.percentile's default). Reads like tokentrace "
            "query: through the collector running on DATA_DIR, else the store directly."
        ),
    )
    _add_store_args(r)
    r.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="which reports (default: all): " + ", ".join(rep.name for rep in REPORTS),
    )
    r.add_argument(
        "--since",
        default="15m",
        metavar="DURATION",
        help="the window ends now and starts this far back: 30s, 15m, 2h, 1d "
        "(default: %(default)s); ignored with --from-ms",
    )
    r.add_argument(
        "--from-ms",
        type=int,
        default=None,
        metavar="MS",
        help="window start, milliseconds since the epoch (with --to-ms)",
    )
    r.add_argument(
        "--to-ms",
        type=int,
        default=None,
        metavar="MS",
        help="window end (exclusive), milliseconds since the epoch (default: now)",
    )
    r.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="rich tables, or JSON: {report name: [row objects]} with latencies in "
        "seconds (default: %(default)s)",
    )
    _add_ca_arg(r)
    r.set_defaults(func=commands.run_report)

    t = subparsers.add_parser(
        "trace",
        help="show one trace as a terminal waterfall (nodes as lanes, tokens condensed)",
        description=(
            "Read one trace from the store and draw it: one lane per node (router, "
            "prefill, decode), each span's start and duration on a shared timeline, and "
            "each decode node's llm.token spans condensed into one row with ITL statistics."
        ),
    )
    t.add_argument("trace_id", metavar="TRACE_ID", help="32 hex digits")
    _add_store_args(t)
    _add_ca_arg(t)
    t.set_defaults(func=commands.run_trace)

    ts = subparsers.add_parser(
        "traces",
        help="list the slowest recent requests with their trace ids",
        description="The slowest requests of a recent window, to pick a trace to look at.",
    )
    ts.add_argument(
        "--slowest",
        type=int,
        default=10,
        metavar="N",
        help="how many requests (default: %(default)s)",
    )
    ts.add_argument(
        "--since",
        default="15m",
        metavar="DURATION",
        help="how far back: 30s, 15m, 2h, 1d (default: %(default)s)",
    )
    ts.add_argument(
        "--by",
        choices=("e2e", "ttft"),
        default="e2e",
        help="order by end-to-end latency or TTFT (default: %(default)s)",
    )
    _add_store_args(ts)
    _add_ca_arg(ts)
    ts.set_defaults(func=commands.run_traces)

    u = subparsers.add_parser(
        "ui",
        help="the latency page: the running collector's, or served here from the store",
        description=(
            "The built-in latency page: TTFT and ITL percentiles per node over time, an "
            "ITL heatmap per decode node, KV transfer bandwidth per source → destination, "
            "the slowest requests and each one's clock-aligned waterfall. If a collector "
            "runs on DATA_DIR (found through DATA_DIR/collector.json), print the URL of its "
            "page and exit. Otherwise open the store (DATA_DIR's embedded store, or "
            "--clickhouse DSN) read-only, serve the page and the query and Jaeger APIs it "
            "reads on --http until Ctrl-C, and print its URL. If the collector requires a "
            "bearer token, the page asks for it once and keeps it in the browser's "
            "localStorage."
        ),
    )
    _add_store_args(u)
    u.add_argument(
        "--http",
        default="127.0.0.1:4320",
        metavar="HOST:PORT",
        help="where to serve the page when no collector is running (default: %(default)s)",
    )
    u.add_argument(
        "--open",
        action="store_true",
        help="also open the page in this machine's default web browser",
    )
    u.add_argument(
        "--auth-token",
        default=None,
        metavar="TOKEN",
        help="when serving the page itself, require Authorization: Bearer TOKEN on its "
        "APIs as the collector does (default: $TOKENTRACE_AUTH_TOKEN; unset: none, which "
        "is refused on any address but loopback unless --allow-unauthenticated)",
    )
    u.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve beyond loopback without --auth-token: anyone who can reach it can "
        "then read every stored trace (default: refuse)",
    )
    _add_query_limit_args(u)
    u.set_defaults(func=commands.run_ui)


def _add_store_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--data-dir", type=Path, default=None, metavar="DIR", help=_DATA_DIR_HELP)
    group.add_argument("--clickhouse", default=None, metavar="DSN", help=_CLICKHOUSE_HELP)


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _seconds(text: str) -> float:
    """A duration in seconds, ``0`` or more (``0.5``)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be 0 or more, got {text!r}")
    return seconds


def _byte_size(text: str) -> int:
    """``123``, ``64K``, ``512M``, ``4G`` (binary units; a trailing ``B``/``iB`` is fine)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 4G)") from None
    size = int(number * _SIZE_UNITS[unit])
    if size < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def _add_query_limit_args(parser: argparse.ArgumentParser) -> None:
    from .query.sqlguard import QueryLimits

    defaults = QueryLimits()
    parser.add_argument(
        "--query-timeout",
        type=float,
        default=defaults.max_execution_time_s,
        metavar="SECONDS",
        help="longest a read (POST /query, the Jaeger API) may run (default: %(default)s)",
    )
    parser.add_argument(
        "--query-max-rows",
        type=int,
        default=defaults.max_result_rows,
        metavar="N",
        help="most rows a read may return (default: %(default)s)",
    )
    parser.add_argument(
        "--query-max-memory",
        type=_byte_size,
        default=defaults.max_memory_bytes,
        metavar="SIZE",
        help="most memory one read may use, e.g. 512M (default: 1G)",
    )


def _add_tls_args(parser: argparse.ArgumentParser) -> None:
    from tokentrace.runtime.tls import TLS_CERT_HELP, TLS_KEY_HELP

    parser.add_argument("--tls-cert", default=None, metavar="PEM", help=TLS_CERT_HELP)
    parser.add_argument("--tls-key", default=None, metavar="PEM", help=TLS_KEY_HELP)


def _add_ca_arg(parser: argparse.ArgumentParser) -> None:
    from tokentrace.runtime.tls import CA_CERT_HELP

    parser.add_argument(
        "--ca-cert",
        default=None,
        metavar="PEM",
        help=CA_CERT_HELP + "; used when the running collector serves TLS",
    )


# -- tokentrace collector -------------------------------------------------------------


def _run_collector(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from tokentrace.runtime.auth import resolve_token
    from tokentrace.runtime.layout import collector_file, default_dsn, wal_dir
    from tokentrace.runtime.tls import tls_from_args

    from .ingest.forward import ForwardConfig
    from .ingest.otlp_grpc import OtlpGrpcConfig
    from .ingest.otlp_http import OtlpHttpConfig
    from .ingest.pipeline import PipelineConfig
    from .ingest.wal import WalConfig, WalError
    from .query.api import ApiConfig
    from .service import Collector, CollectorConfig, parse_hostport, write_collector_file
    from .store import StoreError

    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # While a ClickHouse server is down these warn on every retried connection; the
    # pipeline says it once per outage.
    for noisy in ("urllib3.connectionpool", "clickhouse_connect.driver._backend.http_sync"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    data_dir = commands.data_dir_of(args)
    try:
        grpc_host, grpc_port = parse_hostport(args.otlp_grpc)
        http_host, http_port = parse_hostport(args.otlp_http)
        api_host, api_port = parse_hostport(args.http)
        config = CollectorConfig(
            auth_token=resolve_token(args.auth_token),
            allow_unauthenticated=args.allow_unauthenticated,
            query_limits=commands.query_limits_of(args),
            query_user=(args.query_user or QUERY_USER)
            if args.create_query_user
            else args.query_user,
            query_password=os.environ.get("TOKENTRACE_QUERY_PASSWORD", ""),
            create_query_user=args.create_query_user,
            tls=tls_from_args(args.tls_cert, args.tls_key),
            dsn=args.clickhouse or default_dsn(data_dir),
            wal=WalConfig(
                directory=str(args.wal_dir or wal_dir(data_dir)), max_bytes=args.wal_max_bytes
            ),
            otlp_grpc=OtlpGrpcConfig(host=grpc_host, port=grpc_port),
            otlp_http=OtlpHttpConfig(host=http_host, port=http_port),
            api=ApiConfig(host=api_host, port=api_port),
            forward=tuple(
                ForwardConfig(
                    url,
                    max_backoff_s=args.forward_max_backoff,
                    initial_backoff_s=min(0.5, args.forward_max_backoff),
                )
                for url in args.forward_otlp
            ),
            forward_shutdown_s=args.forward_shutdown_timeout,
            pipeline=PipelineConfig(
                insert_interval_ms=args.insert_interval * 1000.0,
                max_block_bytes=args.insert_block_bytes,
            ),
        )
        collector = Collector(config)
    except ValueError as exc:
        print(f"tokentrace collector: {exc}", file=sys.stderr)
        return 2

    running = commands.running_collector(collector_file(data_dir))
    if running is not None and args.clickhouse is None:
        print(
            f"tokentrace collector: a collector (pid {running.get('pid')}) already serves "
            f"{data_dir}; stop it first",
            file=sys.stderr,
        )
        return 1

    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    info_path = collector_file(data_dir)
    _large_buffers_straight_back_to_the_os()
    try:
        collector.start()
    except (StoreError, WalError, OSError) as exc:
        print(f"tokentrace collector: {exc}", file=sys.stderr)
        return 1
    try:
        info = collector.info()
        write_collector_file(info_path, info)
        print(
            f"tokentrace collector ready otlp-grpc={info['otlp_grpc']} "
            f"otlp-http={info['otlp_http']} http={info['http']} store={info['dsn']} "
            f"wal={info['wal']}"
            + "".join(f" forward={url}" for url in info["forward"])
            + (" tls=on" if info["tls"] else ""),
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        collector.shutdown()
        try:
            import json

            if json.loads(info_path.read_text()).get("pid") == os.getpid():
                info_path.unlink()
        except (OSError, ValueError):
            pass
    return 0


def _large_buffers_straight_back_to_the_os(threshold_bytes: int = 1 << 20) -> None:
    """Have glibc's malloc map every buffer of ``threshold_bytes`` or more on its own and
    unmap it when freed.

    By default glibc raises that threshold (to as much as 32 MiB) as big buffers are
    freed, after which they come from per-thread arenas that keep freed memory: every
    burst of large exports -- or of 64 MiB bodies refused for what they hold -- would
    ratchet resident memory up by tens of MB. Mapping costs a system call per buffer,
    nothing next to filling one. A no-op where malloc is not glibc's.
    """
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3  # from glibc's malloc.h
    mallopt(m_mmap_threshold, threshold_bytes)
