"""The collector's own HTTP API: ``GET /health``, ``GET /metrics`` (Prometheus; see
:mod:`.metrics`), read-only ``POST /query``, the named reports (``GET /reports``,
``GET /reports/{name}?from_ms=…&to_ms=…``; see :mod:`.reports`), the Jaeger-compatible query API
(``/api/...``, ``/api/v3/...``; see :mod:`.jaeger`) and the latency page that reads them
(``GET /ui``; see :mod:`.ui`).

``/query`` is how other processes read a chDB store this collector owns (chDB lets
one process open a data path). Its statements are judged by :mod:`.sqlguard` before
they run; they run in the store's read session, apart from ingest, under its limits.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import decimal
import ipaddress
import math
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..store import QueryResult, Store, StoreError
from .jaeger import jaeger_router
from .reports import REPORTS, report, window_params
from .sqlguard import UnsafeQuery, guarded_query
from .ui import ui_router

__all__ = ["ApiConfig", "QueryCounters", "create_api_app", "json_safe", "result_to_json"]


def _int_param(request: Request, name: str) -> int:
    value = request.query_params.get(name)
    if value is None:
        raise ValueError(f"query parameter {name} (milliseconds since the epoch) is required")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"query parameter {name} must be an integer, got {value!r}") from None


# ClickHouse error codes of a query that hit one of the read session's limits.
_LIMIT_CODES = {
    159: "its time limit (max_execution_time)",
    396: "its result-size limit (max_result_rows / max_result_bytes)",
    241: "its memory limit (max_memory_usage)",
}


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 4320  # 0 picks a free port

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"API port must be 0..65535, got {self.port!r}")


class QueryCounters:
    """``POST /query`` as ``GET /health`` and ``/metrics`` report it: statements running
    now, and statements refused before running. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0
        self.refused = 0

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {"queries_running": self.running, "queries_refused": self.refused}

    def add(self, running: int = 0, refused: int = 0) -> None:
        with self._lock:
            self.running += running
            self.refused += refused


def _limit_hit(exc: StoreError) -> str | None:
    """Which limit a failed query hit, if it was one of the read session's own (a
    server-wide memory shortage is not: that one is worth retrying)."""
    what = _LIMIT_CODES.get(exc.code or 0)
    message = str(exc)
    if what is None or (
        exc.code == 241 and "(for query)" not in message and "Query memory limit" not in message
    ):
        return None
    return what


def json_safe(value: Any) -> Any:
    """``value`` as JSON: datetimes as ISO 8601 (ns kept for DateTime64), Decimal, UUID,
    IP addresses as strings, bytes as UTF-8 (base64 if not text), NaN/inf as strings."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(
        value,
        decimal.Decimal | uuid.UUID | ipaddress.IPv4Address | ipaddress.IPv6Address | dt.timedelta,
    ):
        return str(value)
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(json_safe(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    return str(value)


def result_to_json(result: QueryResult) -> dict[str, Any]:
    """``{"columns": [...], "types": [...], "rows": [[...], ...]}``."""
    return {
        "columns": list(result.column_names),
        "types": list(result.column_types),
        "rows": [[json_safe(v) for v in row] for row in result.rows],
    }


def create_api_app(
    store: Store,
    counters: Callable[[], dict[str, Any]],
    metrics: CollectorRegistry | None = None,
    queries: QueryCounters | None = None,
) -> FastAPI:
    """The ASGI app; queries run on worker threads, in the store's read session.
    ``/health`` answers ``{"status": "ok", **counters()}``; ``/metrics`` serves
    ``metrics`` (when given) in the Prometheus text format. ``POST /query`` runs one
    read statement, refused (400) unless :mod:`.sqlguard` lets it through; one that
    hits a limit of the read session gets 422 naming the limit; ``queries`` counts
    them (the caller reports it in ``counters``)."""
    query_counts = queries if queries is not None else QueryCounters()
    app = FastAPI(title="tokentrace collector", openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **counters()}

    if metrics is not None:
        registry = metrics

        @app.get("/metrics")
        async def prometheus_metrics() -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def run(sql: str, params: dict[str, Any] | None) -> JSONResponse:
        """One read through the guard, answered as /query answers; every report too."""
        query_counts.add(running=1)
        try:
            result = await asyncio.to_thread(guarded_query, store, sql, params)
        except UnsafeQuery as exc:
            query_counts.add(refused=1)
            return JSONResponse({"error": f"refused: {exc}"}, status_code=400)
        except StoreError as exc:
            limit = _limit_hit(exc)
            if limit is not None:
                return JSONResponse(
                    {"error": f"the query stopped at {limit}: {exc}", "code": exc.code},
                    status_code=422,
                )
            return JSONResponse(
                {"error": str(exc), "code": exc.code}, status_code=503 if exc.transient else 400
            )
        finally:
            query_counts.add(running=-1)
        return JSONResponse(result_to_json(result))

    @app.post("/query")
    async def query(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError as exc:
            return JSONResponse({"error": f"request body must be JSON: {exc}"}, status_code=400)
        sql = body.get("sql") if isinstance(body, dict) else None
        if not isinstance(sql, str) or not sql.strip():
            return JSONResponse(
                {"error": 'request body must be {"sql": "<statement>"}'}, status_code=400
            )
        params = body.get("params")
        if params is not None and not isinstance(params, dict):
            return JSONResponse({"error": '"params" must be an object'}, status_code=400)
        return await run(sql, params)

    # The named report queries (reports.py): the demo's and tokentrace report's tables.
    @app.get("/reports")
    async def list_reports() -> dict[str, Any]:
        return {"reports": [r.describe() for r in REPORTS]}

    @app.get("/reports/{name}")
    async def run_report(name: str, request: Request) -> JSONResponse:
        try:
            chosen = report(name)
        except KeyError as exc:
            return JSONResponse({"error": exc.args[0]}, status_code=404)
        try:
            window = window_params(_int_param(request, "from_ms"), _int_param(request, "to_ms"))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return await run(chosen.sql_for(), window)

    # Jaeger's query API (v1 JSON and v3) for Grafana and the Jaeger UI.
    app.include_router(jaeger_router(store))
    # The built-in latency page (GET /ui), which reads the two APIs above.
    app.include_router(ui_router())
    return app
