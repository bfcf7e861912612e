"""The HTTP edge of the Jaeger API: ``/api/...`` (v1) and ``/api/v3/...`` routes, their
query parameters, and errors answered in each version's shape."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ...store import Store, StoreError
from .convert import to_jaeger_traces, to_otlp_json, trace_summaries
from .reader import (
    BadParameter,
    JaegerReader,
    TraceQuery,
    normalize_trace_id,
    parse_duration_ns,
    tag_map,
)

# -- HTTP ------------------------------------------------------------------------------

_HOUR_NS = 3_600_000_000_000
_DAY_MS = 86_400_000


def _v1(data: Any, *, total: int | None = None) -> JSONResponse:
    n = total if total is not None else (len(data) if isinstance(data, list) else 0)
    return JSONResponse({"data": data, "total": n, "limit": 0, "offset": 0, "errors": None})


def _v1_error(status: int, msg: str) -> JSONResponse:
    return JSONResponse(
        {
            "data": None,
            "total": 0,
            "limit": 0,
            "offset": 0,
            "errors": [{"code": status, "msg": msg}],
        },
        status_code=status,
    )


def _v3_error(status: int, msg: str) -> JSONResponse:
    return JSONResponse({"error": {"httpCode": status, "message": msg}}, status_code=status)


def _int_param(params: Mapping[str, str], name: str, default: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise BadParameter(name, f"{raw!r} is not an integer") from exc


def _duration_param(params: Mapping[str, str], name: str) -> int | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        return parse_duration_ns(raw)
    except ValueError as exc:
        raise BadParameter(name, str(exc)) from exc


def _v3_param(params: Mapping[str, str], snake: str) -> str | None:
    """``query.<snake>`` or its camelCase spelling."""
    head, *rest = snake.split("_")
    camel = head + "".join(w.capitalize() for w in rest)
    for name in (f"query.{snake}", f"query.{camel}"):
        if name in params:
            return params[name]
    return None


def _rfc3339_ns(text: str, param: str) -> int:
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise BadParameter(param, f"{text!r} is not an RFC 3339 time") from exc
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    whole = int(value.replace(microsecond=0).timestamp())
    frac = re.search(r"\.(\d+)", text)
    nanos = int(frac.group(1)[:9].ljust(9, "0")) if frac else 0
    return whole * 1_000_000_000 + nanos


def _v1_trace_query(params: Mapping[str, str], tag_params: list[str]) -> TraceQuery:
    service = params.get("service", "")
    if not service:
        raise BadParameter("service", "parameter 'service' is required")
    now_us = time.time_ns() // 1000
    end_us = _int_param(params, "end", now_us)
    start_us = _int_param(params, "start", end_us - _HOUR_NS // 1000)
    if start_us > end_us:
        raise BadParameter("start", "start must not be after end")
    limit = _int_param(params, "limit", 20)
    if limit < 0:
        raise BadParameter("limit", "must not be negative")
    tags: dict[str, str] = {}
    if params.get("tags"):
        tags.update(tag_map(params["tags"], "tags"))
    for tag in tag_params:
        key, sep, value = tag.partition(":")
        if not sep or not key:
            raise BadParameter("tag", f"{tag!r} is not key:value")
        tags[key] = value
    min_d = _duration_param(params, "minDuration")
    max_d = _duration_param(params, "maxDuration")
    if min_d is not None and max_d is not None and max_d < min_d:
        raise BadParameter("maxDuration", "must not be less than minDuration")
    return TraceQuery(
        start_ns=start_us * 1000,
        end_ns=end_us * 1000,
        service=service,
        operation=params.get("operation", ""),
        min_duration_ns=min_d,
        max_duration_ns=max_d,
        tags=tags,
        limit=limit or 20,
    )


def _v3_trace_query(params: Mapping[str, str]) -> TraceQuery:
    bounds = {}
    for snake in ("start_time_min", "start_time_max"):
        raw = _v3_param(params, snake)
        if not raw:
            raise BadParameter(f"query.{snake}", "is required")
        bounds[snake] = _rfc3339_ns(raw, f"query.{snake}")
    durations = {}
    for snake in ("duration_min", "duration_max"):
        raw = _v3_param(params, snake)
        if raw:
            try:
                durations[snake] = parse_duration_ns(raw)
            except ValueError as exc:
                raise BadParameter(f"query.{snake}", str(exc)) from exc
    depth_raw = _v3_param(params, "search_depth")
    try:
        depth = int(depth_raw) if depth_raw else 100
    except ValueError as exc:
        raise BadParameter("query.search_depth", f"{depth_raw!r} is not an integer") from exc
    if depth <= 0:
        raise BadParameter("query.search_depth", "must be greater than 0")
    attrs_raw = _v3_param(params, "attributes")
    return TraceQuery(
        start_ns=bounds["start_time_min"],
        end_ns=bounds["start_time_max"],
        service=_v3_param(params, "service_name") or "",
        operation=_v3_param(params, "operation_name") or "",
        min_duration_ns=durations.get("duration_min"),
        max_duration_ns=durations.get("duration_max"),
        tags=tag_map(attrs_raw, "query.attributes") if attrs_raw else {},
        limit=depth,
    )


class _Answer(Exception):
    """Ends a request early with an error answer: ``status`` and ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[..., Awaitable[JSONResponse]]


def _answering(error: Callable[[int, str], JSONResponse]) -> Callable[[Handler], Handler]:
    """A route handler whose failures become ``error`` answers in its API's shape: a
    bad parameter 400, an early :class:`_Answer` its status, a store error 503
    (transient) or 500. The handler itself only returns its success answer."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def answered(*args: Any, **kwargs: Any) -> JSONResponse:
            try:
                return await handler(*args, **kwargs)
            except _Answer as exc:
                return error(exc.status, exc.message)
            except BadParameter as exc:
                return error(400, str(exc))
            except StoreError as exc:
                return error(503 if exc.transient else 500, str(exc))

        return answered

    return wrap


def _trace_id(raw: str, name: str) -> str:
    try:
        return normalize_trace_id(raw)
    except ValueError as exc:
        raise _Answer(400, f"malformed parameter {name}: {exc}") from None


def jaeger_router(store: Store) -> APIRouter:
    """Routes of the v1 JSON API (``/api/...``) and the v3 API (``/api/v3/...``).
    Queries run on worker threads; store errors answer 503 (transient) or 500."""
    reader = JaegerReader(store)
    router = APIRouter()
    v1 = _answering(_v1_error)
    v3 = _answering(_v3_error)

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    # -- v1 --------------------------------------------------------------------------

    @router.get("/api/services")
    @v1
    async def v1_services() -> JSONResponse:
        return _v1(await run(reader.services))

    @router.get("/api/services/{service}/operations")
    @v1
    async def v1_service_operations(service: str) -> JSONResponse:
        return _v1(sorted({name for name, _ in await run(reader.operations, service)}))

    @router.get("/api/operations")
    @v1
    async def v1_operations(request: Request) -> JSONResponse:
        service = request.query_params.get("service", "")
        if not service:
            raise _Answer(400, "parameter 'service' is required")
        kind = request.query_params.get("spanKind", "")
        res = await run(reader.operations, service, kind)
        return _v1([{"name": name, "spanKind": k} for name, k in res])

    @router.get("/api/traces")
    @v1
    async def v1_find_traces(request: Request) -> JSONResponse:
        params = request.query_params
        trace_ids = [_trace_id(t, "traceID") for t in params.getlist("traceID")]
        if trace_ids:
            rows = await run(reader.get_traces, trace_ids)
        else:
            query = _v1_trace_query(params, params.getlist("tag"))
            rows = await run(reader.find_traces, query)
        return _v1(to_jaeger_traces(rows))

    @router.get("/api/traces/{trace_id}")
    @v1
    async def v1_get_trace(trace_id: str) -> JSONResponse:
        rows = await run(reader.get_traces, [_trace_id(trace_id, "traceID")])
        if not rows:
            raise _Answer(404, "trace not found")
        return _v1(to_jaeger_traces(rows))

    @router.get("/api/dependencies")
    @v1
    async def v1_dependencies(request: Request) -> JSONResponse:
        end_ms = _int_param(request.query_params, "endTs", time.time_ns() // 1_000_000)
        lookback_ms = _int_param(request.query_params, "lookback", _DAY_MS)
        if lookback_ms < 0:
            raise BadParameter("lookback", "must not be negative")
        return _v1(await run(reader.dependencies, end_ms * 1_000_000, lookback_ms * 1_000_000))

    # -- v3 --------------------------------------------------------------------------

    @router.get("/api/v3/services")
    @v3
    async def v3_services() -> JSONResponse:
        return JSONResponse({"services": await run(reader.services)})

    @router.get("/api/v3/operations")
    @v3
    async def v3_operations(request: Request) -> JSONResponse:
        params = request.query_params
        service = params.get("service", "")
        kind = params.get("span_kind", params.get("spanKind", ""))
        res = await run(reader.operations, service, kind)
        return JSONResponse({"operations": [{"name": n, "spanKind": k} for n, k in res]})

    @router.get("/api/v3/traces/{trace_id}")
    @v3
    async def v3_get_trace(trace_id: str) -> JSONResponse:
        rows = await run(reader.get_traces, [_trace_id(trace_id, "trace_id")])
        if not rows:
            raise _Answer(404, "trace not found")
        return JSONResponse({"result": to_otlp_json(rows)})

    @router.get("/api/v3/traces")
    @v3
    async def v3_find_traces(request: Request) -> JSONResponse:
        rows = await run(reader.find_traces, _v3_trace_query(request.query_params))
        if not rows:
            raise _Answer(404, "No traces found")
        return JSONResponse({"result": to_otlp_json(rows)})

    @router.get("/api/v3/trace-summaries")
    @v3
    async def v3_trace_summaries(request: Request) -> JSONResponse:
        rows = await run(reader.find_traces, _v3_trace_query(request.query_params))
        return JSONResponse({"summaries": trace_summaries(rows)})

    return router
