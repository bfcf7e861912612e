"""OTLP/HTTP trace receiver: ``POST /v1/traces`` → :meth:`Consumer.consume` (the pipeline).

Accepts ``application/x-protobuf`` and ``application/json`` (optionally gzip-encoded)
and answers in the request's encoding. Errors carry a JSON body ``{"code": <gRPC status
code>, "message": ...}``: 400 for a malformed request (never retry), 413 for an oversized
one, 415 for another content type or encoding, 429 with ``Retry-After`` when the
collector's disk budget for spans not yet in ClickHouse is full, 503 with ``Retry-After``
when the spans could not be logged (both: retry).

A body larger than ``max_body_bytes`` -- on the wire, or once inflated -- is never held
in memory: a ``Content-Length`` above the limit is answered 413 before any of the body
is read, and a body without one is read only up to the limit. (uvicorn then reads and
discards the rest of the body, so the client, still sending, gets to see the 413.)
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf import json_format
from starlette.requests import ClientDisconnect

from .otlp_grpc import MAX_MESSAGE_BYTES, RETRY_AFTER_S, export_response
from .otlp_parse import DecodeError, parse_json
from .pipeline import Consumer, ExportResult, PipelineFull, PipelineUnavailable

__all__ = ["OtlpHttpConfig", "create_otlp_http_app"]

_PROTOBUF = "application/x-protobuf"
_JSON = "application/json"
# google.rpc.Code values, as OTLP's Status body uses them.
_INVALID_ARGUMENT = 3
_RESOURCE_EXHAUSTED = 8
_UNAVAILABLE = 14


@dataclass(frozen=True)
class OtlpHttpConfig:
    host: str = "127.0.0.1"
    port: int = 4318  # 0 picks a free port
    max_body_bytes: int = MAX_MESSAGE_BYTES

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"OTLP/HTTP port must be 0..65535, got {self.port!r}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes!r}")


def _error(status: int, code: int, message: str) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


def create_otlp_http_app(pipeline: Consumer, config: OtlpHttpConfig | None = None) -> FastAPI:
    """The ASGI app; exports block a worker thread (not the event loop) until committed."""
    config = config or OtlpHttpConfig()
    config.validate()
    app = FastAPI(
        title="tokentrace OTLP/HTTP receiver", openapi_url=None, docs_url=None, redoc_url=None
    )

    @app.post("/v1/traces")
    async def traces(request: Request) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in (_PROTOBUF, _JSON):
            return _error(
                415,
                _INVALID_ARGUMENT,
                f"unsupported Content-Type {content_type or '(none)'!r}: "
                f"use {_PROTOBUF} or {_JSON}",
            )
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity", "gzip"):
            return _error(
                415,
                _INVALID_ARGUMENT,
                f"unsupported Content-Encoding {encoding!r}: use gzip or none",
            )
        limit = config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _error(
                413,
                _RESOURCE_EXHAUSTED,
                f"request body of {int(declared)} bytes (Content-Length) exceeds {limit}",
            )
        try:
            received = await _read_body(request, limit)
        except ClientDisconnect:
            return _error(400, _INVALID_ARGUMENT, "client disconnected before the whole body")
        if received is None:
            return _error(413, _RESOURCE_EXHAUSTED, f"request body exceeds {limit} bytes")
        try:
            result = await asyncio.to_thread(
                _consume, pipeline, received, content_type, encoding == "gzip", limit
            )
        except _TooLarge as exc:
            return _error(413, _RESOURCE_EXHAUSTED, str(exc))
        except (DecodeError, _BadGzip) as exc:
            return _error(400, _INVALID_ARGUMENT, str(exc))
        except PipelineFull as exc:
            return _error(429, _RESOURCE_EXHAUSTED, str(exc))
        except PipelineUnavailable as exc:
            return _error(503, _UNAVAILABLE, str(exc))
        response = export_response(result)
        if content_type == _JSON:
            return JSONResponse(json_format.MessageToDict(response))
        return Response(response.SerializeToString(), media_type=_PROTOBUF)

    return app


async def _read_body(request: Request, limit: int) -> bytearray | None:
    """The request body, or None as soon as it exceeds ``limit`` bytes: what was read
    so far is dropped, and the rest is never read here."""
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            return None
        body += chunk
    return body


def _consume(
    pipeline: Consumer, body: bytes | bytearray, content_type: str, gzipped: bool, limit: int
) -> ExportResult:
    """Inflate, parse and consume one export, on a worker thread: a 64 MiB body takes
    long enough to stall every other request if the event loop did it."""
    data = _gunzip(body, limit) if gzipped else body
    # The pipeline takes the request as gRPC hands it on: serialized protobuf.
    wire = parse_json(data).SerializeToString() if content_type == _JSON else bytes(data)
    return pipeline.consume(wire)


class _BadGzip(ValueError):
    """The body is not valid gzip (400)."""


class _TooLarge(ValueError):
    """The body inflates past the limit (413, not 400: it may be valid, just too big)."""


def _gunzip(body: bytes | bytearray, limit: int) -> bytes:
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = decompressor.decompress(body, limit + 1)
    except (zlib.error, gzip.BadGzipFile) as exc:
        raise _BadGzip(f"invalid gzip body: {exc}") from exc
    if len(out) > limit:
        raise _TooLarge(f"gzip body inflates beyond {limit} bytes")
    if not decompressor.eof:
        raise _BadGzip("invalid gzip body: truncated")
    return out
