"""The reading commands: ``tokentrace query``, ``report``, ``trace``, ``traces`` and
``ui``, and what they share with ``tokentrace collector`` (where the data directory is,
whether a collector runs on it, the read limits). Each reads through the collector that
runs on the data directory (it owns an embedded store), else the store directly, with
the same guard and limits. Top-level imports stay light: ``tokentrace --help`` loads
this module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .reports import REPORTS

__all__ = [
    "api_url",
    "data_dir_of",
    "parse_since",
    "query_limits_of",
    "run_query",
    "run_report",
    "run_trace",
    "run_traces",
    "run_ui",
    "running_collector",
]


def query_limits_of(args: argparse.Namespace) -> Any:
    from .sqlguard import QueryLimits

    return QueryLimits(
        max_execution_time_s=args.query_timeout,
        max_result_rows=args.query_max_rows,
        max_memory_bytes=args.query_max_memory,
    )


def data_dir_of(args: argparse.Namespace) -> Path:
    from tokentrace.runtime.layout import default_data_dir

    return Path(args.data_dir) if args.data_dir is not None else default_data_dir()


def api_url(info: dict[str, Any]) -> str:
    """The API's base URL from collector.json (one written before TLS existed has no
    ``http_url``: plaintext)."""
    return str(info.get("http_url") or f"http://{info['http']}")


def running_collector(path: Path) -> dict[str, Any] | None:
    """The collector.json contents if that collector answers /health, else None."""
    import json

    import httpx

    try:
        info = json.loads(path.read_text())
        # Liveness only: GET /health carries no SQL and no token, so the certificate is
        # not verified here; every request that does carry them verifies it.
        response = httpx.get(f"{api_url(info)}/health", timeout=2.0, verify=False)
    except (OSError, ValueError, KeyError, TypeError, httpx.HTTPError):
        return None
    return info if response.status_code == 200 else None


# -- tokentrace query -----------------------------------------------------------------


class _QueryFailed(Exception):
    pass


def run_query(args: argparse.Namespace) -> int:
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
    data_dir = data_dir_of(args)
    info = running_collector(collector_file(data_dir))
    if info is not None:
        import httpx

        url = api_url(info)
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
    from ..store import ReaderConfig, StoreError, open_store
    from .api import result_to_json
    from .sqlguard import QueryLimits, UnsafeQuery, guarded_query

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


def parse_since(text: str) -> int:
    """``15m`` → 900 seconds; ValueError naming the value otherwise."""
    number, unit = text[:-1], text[-1:]
    if unit not in _UNITS_S or not number.isdigit() or int(number) <= 0:
        raise ValueError(f"--since must look like 30s, 15m, 2h or 1d, got {text!r}")
    return int(number) * _UNITS_S[unit]


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]


def run_trace(args: argparse.Namespace) -> int:
    import re

    from rich.console import Console

    from .waterfall import TRACE_SQL, TraceSpan, render_waterfall

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


def run_report(args: argparse.Namespace) -> int:
    import json
    import time

    from rich.console import Console

    from .reports import report, report_table, window_params

    try:
        chosen = [report(name) for name in args.names] or list(REPORTS)
        now_ms = time.time_ns() // 1_000_000
        to_ms = args.to_ms if args.to_ms is not None else now_ms + 1
        from_ms = (
            args.from_ms if args.from_ms is not None else to_ms - 1000 * parse_since(args.since)
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


def run_traces(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    try:
        since_s = parse_since(args.since)
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


def run_ui(args: argparse.Namespace) -> int:
    from tokentrace.runtime.layout import collector_file

    data_dir = data_dir_of(args)
    info = None if args.clickhouse else running_collector(collector_file(data_dir))
    if info is None:
        return _serve_ui(args, data_dir)
    url = f"{api_url(info)}/ui/"
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

    from ..servers import AsgiServers, hostport
    from ..service import parse_hostport
    from ..store import ReaderConfig, StoreError, open_store
    from .api import create_api_app
    from .ui import UI_PATHS

    # Ctrl-C and SIGTERM only set this, whatever the main thread is doing at the time
    # (set before chDB loads, as the collector does).
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        host, port = parse_hostport(args.http)
        token = resolve_token(args.auth_token)
        refuse_unauthenticated_exposure({"the page": host}, token, args.allow_unauthenticated)
        limits = query_limits_of(args)
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
