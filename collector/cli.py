"""``tokentrace collector``, ``query``, ``trace``, ``traces`` and ``ui``.

Registration imports nothing heavy; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from tokentrace.schemas.ddl import QUERY_USER

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
            "line. An export is acknowledged once it is in ClickHouse or fsynced to the "
            "write-ahead log (DATA_DIR/wal); what the log holds is inserted when ClickHouse "
            "takes it, also after a crash or restart, exactly once. SIGINT/SIGTERM stop it "
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
        "/query, Jaeger's query API under /api/ (v1) and /api/v3/, and the latency page "
        "GET /ui (default: %(default)s)",
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
    q.set_defaults(func=_run_query)

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
    r.set_defaults(func=_run_report)

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
    t.set_defaults(func=_run_trace)

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
    ts.set_defaults(func=_run_traces)

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
    u.set_defaults(func=_run_ui)


def _add_store_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--data-dir", type=Path, default=None, metavar="DIR", help=_DATA_DIR_HELP)
    group.add_argument("--clickhouse", default=None, metavar="DSN", help=_CLICKHOUSE_HELP)


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


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


def _query_limits(args: argparse.Namespace) -> Any:
    from .query.sqlguard import QueryLimits

    return QueryLimits(
        max_execution_time_s=args.query_timeout,
        max_result_rows=args.query_max_rows,
        max_memory_bytes=args.query_max_memory,
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


def _data_dir(args: argparse.Namespace) -> Path:
    from tokentrace.runtime.layout import default_data_dir

    return Path(args.data_dir) if args.data_dir is not None else default_data_dir()


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
    data_dir = _data_dir(args)
    try:
        grpc_host, grpc_port = parse_hostport(args.otlp_grpc)
        http_host, http_port = parse_hostport(args.otlp_http)
        api_host, api_port = parse_hostport(args.http)
        config = CollectorConfig(
            auth_token=resolve_token(args.auth_token),
            allow_unauthenticated=args.allow_unauthenticated,
            query_limits=_query_limits(args),
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
        )
        collector = Collector(config)
    except ValueError as exc:
        print(f"tokentrace collector: {exc}", file=sys.stderr)
        return 2

    running = _running_collector(collector_file(data_dir))
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


def _api_url(info: dict[str, Any]) -> str:
    """The API's base URL from collector.json (one written before TLS existed has no
    ``http_url``: plaintext)."""
    return str(info.get("http_url") or f"http://{info['http']}")


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


def _running_collector(path: Path) -> dict[str, Any] | None:
    """The collector.json contents if that collector answers /health, else None."""
    import json

    import httpx

    try:
        info = json.loads(path.read_text())
        # Liveness only: GET /health carries no SQL and no token, so the certificate is
        # not verified here; every request that does carry them verifies it.
        response = httpx.get(f"{_api_url(info)}/health", timeout=2.0, verify=False)
    except (OSError, ValueError, KeyError, TypeError, httpx.HTTPError):
        return None
    return info if response.status_code == 200 else None


# -- tokentrace query -----------------------------------------------------------------


class _QueryFailed(Exception):
    pass


def _run_query(args: argparse.Namespace) -> int:
    try:
        result = _query(args, args.sql)
    except _QueryFailed as exc:
        print(f"tokentrace query: {exc}", file=sys.stderr)
        return 1
    _print_result(result, args.format)
    return 0


def _query(
    args: argparse.Namespace, sql: str, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``{"columns", "types", "rows"}`` as the /query API returns it; ``params`` are
    ClickHouse query parameters."""
    from tokentrace.runtime.auth import auth_headers
    from tokentrace.runtime.layout import collector_file, default_dsn
    from tokentrace.runtime.tls import (
        CA_CERT_ENV,
        certificate_error,
        client_verify,
        resolve_ca_cert,
    )

    if args.clickhouse:
        return _query_direct(args.clickhouse, sql, params)
    data_dir = _data_dir(args)
    info = _running_collector(collector_file(data_dir))
    if info is not None:
        import httpx

        url = _api_url(info)
        ca_file = resolve_ca_cert(args.ca_cert)
        try:
            verify = client_verify(ca_file)
        except ValueError as exc:
            raise _QueryFailed(str(exc)) from exc
        try:
            response = httpx.post(
                f"{url}/query",
                json={"sql": sql, **({"params": params} if params else {})},
                headers=auth_headers(),
                timeout=300.0,
                verify=verify,
            )
        except httpx.HTTPError as exc:
            failure = certificate_error(exc)
            if failure is not None:
                against = f"CA file {str(ca_file)!r}" if ca_file else "the system's CAs"
                raise _QueryFailed(
                    f"the collector at {url} serves a certificate that does not verify "
                    f"against {against} ({failure.verify_message}); give its CA with "
                    f"--ca-cert or {CA_CERT_ENV}"
                ) from exc
            raise _QueryFailed(f"collector at {url} did not answer: {exc}") from exc
        body = response.json()
        if response.status_code != 200:
            raise _QueryFailed(body.get("error") or response.text)
        return dict(body)
    return _query_direct(default_dsn(data_dir), sql, params)


def _query_direct(dsn: str, sql: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    from .query.api import result_to_json
    from .query.sqlguard import QueryLimits, UnsafeQuery, guarded_query
    from .store import ReaderConfig, StoreError, open_store

    try:
        store = open_store(dsn, reader=ReaderConfig(settings=QueryLimits().settings()))
    except (StoreError, ValueError) as exc:
        raise _QueryFailed(str(exc)) from exc
    try:
        return result_to_json(guarded_query(store, sql, params))
    except UnsafeQuery as exc:
        raise _QueryFailed(f"refused: {exc}") from exc
    except StoreError as exc:
        raise _QueryFailed(str(exc)) from exc
    finally:
        store.close()


def _cell_text(value: Any) -> str:
    import json

    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _print_result(result: dict[str, Any], fmt: str) -> None:
    columns: list[str] = result["columns"]
    rows: list[list[Any]] = result["rows"]
    if fmt == "json":
        import json

        objects = [dict(zip(columns, row, strict=True)) for row in rows]
        sys.stdout.write(json.dumps(objects, indent=2) + "\n")
    elif fmt == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell_text(v) for v in row])
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(*columns)
        for row in rows:
            table.add_row(*(_cell_text(v) if v is not None else "NULL" for v in row))
        Console().print(table)
        print(f"{len(rows)} row{'s' if len(rows) != 1 else ''}", file=sys.stderr)
    sys.stdout.flush()


# -- tokentrace trace / traces --------------------------------------------------------

_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_since(text: str) -> int:
    """``15m`` → 900 seconds; ValueError naming the value otherwise."""
    number, unit = text[:-1], text[-1:]
    if unit not in _UNITS_S or not number.isdigit() or int(number) <= 0:
        raise ValueError(f"--since must look like 30s, 15m, 2h or 1d, got {text!r}")
    return int(number) * _UNITS_S[unit]


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]


def _run_trace(args: argparse.Namespace) -> int:
    import re

    from rich.console import Console

    from .query.waterfall import TRACE_SQL, TraceSpan, render_waterfall

    trace_id = args.trace_id.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{32}", trace_id) or trace_id == "0" * 32:
        print(
            f"tokentrace trace: a trace id is 32 hex digits, got {args.trace_id!r}", file=sys.stderr
        )
        return 2
    try:
        rows = _rows(_query(args, TRACE_SQL.format(trace_id=trace_id)))
    except _QueryFailed as exc:
        print(f"tokentrace trace: {exc}", file=sys.stderr)
        return 1
    if not rows:
        print(f"tokentrace trace: no spans of trace {trace_id} in the store", file=sys.stderr)
        return 1
    Console().print(render_waterfall(trace_id, [TraceSpan.from_row(r) for r in rows]))
    return 0


def _run_report(args: argparse.Namespace) -> int:
    import json
    import time

    from rich.console import Console

    from .query.reports import report, report_table, window_params

    try:
        chosen = [report(name) for name in args.names] or list(REPORTS)
        now_ms = time.time_ns() // 1_000_000
        to_ms = args.to_ms if args.to_ms is not None else now_ms + 1
        from_ms = (
            args.from_ms if args.from_ms is not None else to_ms - 1000 * _parse_since(args.since)
        )
        params = window_params(from_ms, to_ms)
    except (KeyError, ValueError) as exc:
        print(f"tokentrace report: {exc.args[0]}", file=sys.stderr)
        return 2
    results = {}
    for rep in chosen:
        try:
            results[rep.name] = _rows(_query(args, rep.sql_for(), params))
        except _QueryFailed as exc:
            print(f"tokentrace report: {rep.name}: {exc}", file=sys.stderr)
            return 1
    if args.format == "json":
        print(json.dumps(results, indent=2))
        return 0
    import datetime as dt

    def utc(ms: int) -> str:
        return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")

    console = Console()
    console.print(f"rows with {utc(from_ms)} <= ts < {utc(to_ms)} UTC", highlight=False)
    for rep in chosen:
        console.print(report_table(rep, results[rep.name]))
    return 0


def _run_traces(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    try:
        since_s = _parse_since(args.since)
    except ValueError as exc:
        print(f"tokentrace traces: {exc}", file=sys.stderr)
        return 2
    if args.slowest <= 0:
        print(f"tokentrace traces: --slowest must be positive, got {args.slowest}", file=sys.stderr)
        return 2
    order = "e2e_s" if args.by == "e2e" else "ttft_s"
    sql = (
        "SELECT trace_id, request_id, ts, router_node, prefill_node, decode_node, "
        "ttft_s, e2e_s, output_tokens, status FROM tokentrace.requests "
        f"WHERE ts >= now64(9) - toIntervalSecond({since_s}) "
        f"ORDER BY {order} DESC LIMIT {int(args.slowest)}"
    )
    try:
        rows = _rows(_query(args, sql))
    except _QueryFailed as exc:
        print(f"tokentrace traces: {exc}", file=sys.stderr)
        return 1
    table = Table(
        title=f"slowest {len(rows)} requests by {args.by} in the last {args.since}",
        title_justify="left",
    )
    for col in ("trace id", "request id", "decode node", "TTFT ms", "E2E ms", "tokens", "status"):
        table.add_column(col, justify="right" if col.endswith(("ms", "tokens")) else "left")
    for r in rows:
        table.add_row(
            str(r["trace_id"]),
            str(r["request_id"]),
            str(r["decode_node"] or "—"),
            f"{r['ttft_s'] * 1000:.2f}" if r["ttft_s"] is not None else "—",
            f"{r['e2e_s'] * 1000:.2f}" if r["e2e_s"] is not None else "—",
            str(r["output_tokens"] if r["output_tokens"] is not None else "—"),
            str(r["status"]),
        )
    console = Console()
    console.print(table)
    if rows:
        console.print(f"see one: tokentrace trace {rows[0]['trace_id']}")
    return 0


# -- tokentrace ui --------------------------------------------------------------------


def _run_ui(args: argparse.Namespace) -> int:
    from tokentrace.runtime.layout import collector_file

    data_dir = _data_dir(args)
    info = None if args.clickhouse else _running_collector(collector_file(data_dir))
    if info is None:
        return _serve_ui(args, data_dir)
    url = f"{_api_url(info)}/ui/"
    print(url, flush=True)
    return _open_in_browser(url) if args.open else 0


def _open_in_browser(url: str) -> int:
    import webbrowser

    if not webbrowser.open(url):
        print("tokentrace ui: found no web browser to open; open the URL above", file=sys.stderr)
        return 1
    return 0


def _serve_ui(args: argparse.Namespace, data_dir: Path) -> int:
    """Serve the page and the read-only APIs it needs from the store itself: the
    collector's API app without its receivers (so nothing can be written)."""
    import signal
    import threading

    from tokentrace.runtime.auth import (
        BearerAuthMiddleware,
        refuse_unauthenticated_exposure,
        resolve_token,
    )
    from tokentrace.runtime.layout import default_dsn

    from .query.api import create_api_app
    from .query.ui import UI_PATHS
    from .servers import AsgiServers, hostport
    from .service import parse_hostport
    from .store import ReaderConfig, StoreError, open_store

    # Ctrl-C and SIGTERM only set this, whatever the main thread is doing at the time
    # (set before chDB loads, as the collector does).
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        host, port = parse_hostport(args.http)
        token = resolve_token(args.auth_token)
        refuse_unauthenticated_exposure({"the page": host}, token, args.allow_unauthenticated)
        limits = _query_limits(args)
        limits.validate()
    except ValueError as exc:
        print(f"tokentrace ui: {exc}", file=sys.stderr)
        return 2
    try:
        store = open_store(
            args.clickhouse or default_dsn(data_dir), reader=ReaderConfig(limits.settings())
        )
    except (ValueError, StoreError) as exc:
        print(f"tokentrace ui: {exc}", file=sys.stderr)
        return 1
    servers = AsgiServers()
    try:
        app: Any = create_api_app(
            store, lambda: {"serving": "tokentrace ui (read-only, no receivers)"}
        )
        if token:
            app = BearerAuthMiddleware(app, token, open_paths=("/health", *UI_PATHS))
        try:
            bound = servers.serve("the page", app, host, port)
        except OSError as exc:
            print(f"tokentrace ui: cannot serve on {args.http}: {exc}", file=sys.stderr)
            return 1
        url = f"http://{hostport(host, bound)}/ui/"
        print(url, flush=True)
        print(f"serving {store.dsn} read-only; Ctrl-C to stop", file=sys.stderr, flush=True)
        if args.open and _open_in_browser(url):
            stop.set()
        while not stop.wait(0.5):
            pass
        return 0
    finally:
        servers.close()
        store.close()
