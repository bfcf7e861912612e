"""The router: an OpenAI-compatible front end that runs each request as prefill then decode.

Orchestration follows vLLM's disaggregated proxy for the NixlConnector: the client's
request goes to a prefill worker with ``max_tokens: 1`` and
``kv_transfer_params.do_remote_decode``; the ``kv_transfer_params`` it answers with
(opaque here) go with the original request to a decode worker, whose response (SSE or
JSON) is relayed to the client. Each request is one ``llm.request`` SERVER span, the
parent of the workers' spans through the ``traceparent`` header.

An aggregated deployment (``worker_urls``: workers that do both, ``tokentrace worker
--role both`` or any vLLM server without a KV connector) gets the whole request on one
worker instead, picked the same way; its ``llm.request`` span is the same, with that
worker as both the prefill and the decode node, so the ``requests`` view reads the
same in both modes.

Concurrency: one event loop; worker bookkeeping is touched only from it. One shared
``httpx.AsyncClient`` carries all worker traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from opentelemetry.trace import Span
from starlette.background import BackgroundTask

from tokentrace.instrument import (
    ArrivalStampMiddleware,
    ServingMetrics,
    Tracing,
    arrival_s,
    extract,
    inject,
    setup_tracing,
    spans,
    wall_ns,
)
from tokentrace.instrument.clock import (
    CLOCK_HEADER,
    OffsetEstimator,
    now_ns,
)
from tokentrace.instrument.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tokentrace.runtime.auth import BearerAuthMiddleware
from tokentrace.runtime.tls import TlsConfig
from tokentrace.schemas import attributes as A
from tokentrace.serving import openai_protocol as P
from tokentrace.serving.serve import CLIENT_KEEPALIVE_S, serve
from tokentrace.serving.workers import Lease, Worker, WorkerPool

__all__ = [
    "PREFILL_KV_TRANSFER_PARAMS",
    "REQUEST_ID_HEADER",
    "RouterConfig",
    "create_app",
    "aggregated_request_body",
    "decode_request_body",
    "new_request_id",
    "prefill_request_body",
    "run",
]

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"

# What the prefill worker is told: compute the KV, keep it for a remote decode to pull.
PREFILL_KV_TRANSFER_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

# Sampling limits a prefill worker cannot honour with max_tokens = 1 (as vLLM's proxy).
_PREFILL_DROPPED_FIELDS = ("stream_options", "min_tokens", "min_completion_tokens")

_STARTUP_CLOCK_SAMPLES = 8
_COMPLETIONS = "/v1/completions"
_CHAT = "/v1/chat/completions"


# -- configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class RouterConfig:
    """Router settings. URLs are worker base URLs (``http://host:port``); sequences are
    stored as tuples with trailing slashes removed.

    ``request_timeout_s`` bounds each worker call's connect/write/pool wait and every
    single read of a response (so a stream may run longer, as long as tokens keep
    coming). A worker that refuses connections is skipped for at least
    ``unhealthy_cooldown_s`` and until its ``/health`` answers again. Name either
    ``prefill_urls`` and ``decode_urls`` (disaggregated) or ``worker_urls`` (aggregated:
    workers that do both), not both kinds. Every worker's
    ``/health`` is probed every ``health_probe_interval_s``; those exchanges and the
    requests themselves are the samples of each worker's clock offset estimate, which
    intersects the exchanges' bounds over the last ``clock_window_s`` seconds
    (:class:`~tokentrace.instrument.clock.OffsetEstimator`).
    """

    prefill_urls: Sequence[str] = ()
    decode_urls: Sequence[str] = ()
    worker_urls: Sequence[str] = ()  # aggregated: each does prefill and decode
    host: str = "127.0.0.1"
    port: int = 8000
    node_id: str | None = None
    otlp_endpoint: str | None = None
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    unhealthy_cooldown_s: float = 3.0
    health_probe_interval_s: float = 1.0
    models_cache_ttl_s: float = 30.0
    clock_window_s: float = 30.0
    auth_token: str | None = None  # when set, clients must send it (all but /health)
    tls: TlsConfig | None = None  # when set, clients connect with HTTPS (and only HTTPS)

    def __post_init__(self) -> None:
        for name in ("prefill_urls", "decode_urls", "worker_urls"):
            urls = getattr(self, name)
            if isinstance(urls, str):
                urls = [urls]
            object.__setattr__(self, name, tuple(str(u).rstrip("/") for u in urls))

    def validate(self) -> RouterConfig:
        """Raise ``ValueError`` naming the first bad setting; return self."""
        if self.worker_urls:
            if self.prefill_urls or self.decode_urls:
                raise ValueError(
                    "worker_urls (aggregated) cannot be combined with prefill_urls or "
                    "decode_urls (disaggregated): run one router per deployment"
                )
            names: tuple[str, ...] = ("worker_urls",)
        else:
            names = ("prefill_urls", "decode_urls")
        for name in names:
            urls = getattr(self, name)
            if not urls:
                raise ValueError(
                    f"{name} must name at least one worker URL (or name worker_urls for an "
                    "aggregated deployment)"
                )
            for url in urls:
                if not url.startswith(("http://", "https://")):
                    raise ValueError(f"{name}: worker URL must start with http(s)://, got {url!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}")
        if not self.host:
            raise ValueError("host must not be empty")
        for name in (
            "request_timeout_s",
            "connect_timeout_s",
            "unhealthy_cooldown_s",
            "health_probe_interval_s",
            "models_cache_ttl_s",
            "clock_window_s",
        ):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if self.tls is not None:
            self.tls.validate()
        return self


# -- pure request rewriting ----------------------------------------------------------


def new_request_id() -> str:
    """A fresh request id, ``cmpl-<uuid4 hex>``."""
    return f"cmpl-{uuid.uuid4().hex}"


def prefill_request_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The prefill worker's request: the client's body with one output token, no
    streaming, and ``kv_transfer_params`` asking it to hold the KV for a remote decode."""
    out = {k: v for k, v in body.items() if k not in _PREFILL_DROPPED_FIELDS}
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out["kv_transfer_params"] = dict(PREFILL_KV_TRANSFER_PARAMS)
    return out


def decode_request_body(
    body: Mapping[str, Any], kv_transfer_params: Any, stream: bool
) -> dict[str, Any]:
    """The decode worker's request: the client's body plus the prefill worker's
    ``kv_transfer_params`` (passed on unchanged). A stream always asks for the usage
    chunk, so the router learns the output token count."""
    out = aggregated_request_body(body, stream)
    out["kv_transfer_params"] = kv_transfer_params
    return out


def aggregated_request_body(body: Mapping[str, Any], stream: bool) -> dict[str, Any]:
    """The request for a worker that does both: the client's body, a stream asking for
    the usage chunk (the router learns the token counts from it)."""
    out = dict(body)
    if stream:
        options = out.get("stream_options")
        options = dict(options) if isinstance(options, Mapping) else {}
        options["include_usage"] = True
        out["stream_options"] = options
    return out


class _RouteError(Exception):
    """Answer the client with ``status`` and ``content`` (bytes from a worker, or a dict)."""

    def __init__(
        self, status: int, content: bytes | dict[str, Any], media_type: str = "application/json"
    ) -> None:
        super().__init__(status)
        self.status = status
        self.content = content
        self.media_type = media_type

    @classmethod
    def make(cls, status: int, message: str, param: str | None = None) -> _RouteError:
        return cls(status, P.error_body(message, P.error_type(status), status, param))

    @property
    def message(self) -> str:
        if isinstance(self.content, dict):
            return str(self.content.get("error", {}).get("message", self.status))
        return self.content[:200].decode("utf-8", "replace")

    def response(self, headers: Mapping[str, str]) -> Response:
        if isinstance(self.content, dict):
            return JSONResponse(self.content, status_code=self.status, headers=dict(headers))
        return Response(
            self.content,
            status_code=self.status,
            media_type=self.media_type,
            headers=dict(headers),
        )


_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)


@dataclass
class _RequestState:
    """Per-request bookkeeping: monotonic times, filled on the way, read when the span ends."""

    request_id: str
    span: Span
    arrival_s: float
    stream: bool
    input_tokens: int | None = None
    output_tokens: int | None = None
    first_chunk_s: float | None = None  # the first chunk with choices, once written
    last_chunk_s: float | None = None  # the latest chunk with choices, once written
    finish_reasons: list[str] = field(default_factory=list)
    status: int = 200
    error: str | None = None
    model: str = ""  # as the client named it: the metrics' model label
    metrics: ServingMetrics | None = None

    def wrote_chunk(self) -> None:
        """A chunk with choices has just been written to the client."""
        self.last_chunk_s = time.monotonic()
        if self.first_chunk_s is None:
            self.first_chunk_s = self.last_chunk_s

    def finish(self) -> None:
        """Set the end-of-request attributes, observe the request's metrics and end the
        span. Call exactly once."""
        now = time.monotonic()
        ttft_s = e2e_attr = None
        e2e_s = now - self.arrival_s
        if self.error is None:
            first = self.first_chunk_s if self.stream else now
            if first is not None:
                ttft_s = first - self.arrival_s
            # As a benchmark client times E2E: to the last content, not past the usage
            # chunk and [DONE], which can wait for the worker's next write under load.
            last = self.last_chunk_s if self.stream else now
            if last is not None:
                e2e_s = e2e_attr = last - self.arrival_s
        if self.metrics is not None:
            # Before the span ends, so a request whose row is stored is always counted.
            self.metrics.observe_request(
                self.model, self.error is None, e2e_s, ttft_s, self.output_tokens
            )
        spans.end_request(
            self.span,
            status=self.status,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            ttft_s=ttft_s,
            e2e_s=e2e_attr,
            finish_reasons=self.finish_reasons,
            error=self.error,
        )


class _Router:
    def __init__(self, config: RouterConfig, tracing: Tracing) -> None:
        self.config = config
        self.tracing = tracing
        self.metrics = ServingMetrics(tracing.node_id, "router")
        window = config.clock_window_s
        self.prefill = WorkerPool(
            "prefill",
            [Worker(u, "prefill", clock=OffsetEstimator(window)) for u in config.prefill_urls],
        )
        self.decode = WorkerPool(
            "decode",
            [Worker(u, "decode", clock=OffsetEstimator(window)) for u in config.decode_urls],
        )
        self.both = WorkerPool(
            "both",
            [Worker(u, "both", clock=OffsetEstimator(window)) for u in config.worker_urls],
        )
        self._client: httpx.AsyncClient | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._models: dict[str, Any] | None = None
        self._models_at = 0.0
        self._drains: set[asyncio.Task[None]] = set()

    # -- lifecycle --

    async def start(self) -> None:
        timeout = httpx.Timeout(
            self.config.request_timeout_s, connect=self.config.connect_timeout_s, pool=None
        )
        limits = httpx.Limits(
            max_connections=None, max_keepalive_connections=512, keepalive_expiry=CLIENT_KEEPALIVE_S
        )
        self._client = httpx.AsyncClient(timeout=timeout, limits=limits)
        await asyncio.gather(*(self._probe(w) for w in self._all_workers()))
        # A few more exchanges per worker before serving, so the first requests already
        # get a tight clock offset: one sample is only as good as its round trip.
        for _ in range(_STARTUP_CLOCK_SAMPLES):
            for worker in self._all_workers():
                if worker.healthy:
                    await self._probe(worker)
        self._probe_task = asyncio.create_task(self._probe_loop(), name="router-health-probe")

    async def shutdown(self) -> None:
        task, self._probe_task = self._probe_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        self.tracing.shutdown()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("router not started (run it under the app's lifespan)")
        return self._client

    def _all_workers(self) -> list[Worker]:
        return self.prefill.workers + self.decode.workers + self.both.workers

    async def _probe(self, worker: Worker) -> None:
        try:
            t0 = now_ns()
            resp = await self.client.get(
                f"{worker.url}/health",
                headers={CLOCK_HEADER: "1"},
                timeout=self.config.connect_timeout_s,
            )
            worker.observe_clock(t0, resp, now_ns())
        except httpx.HTTPError as exc:
            worker.mark_down(self.config.unhealthy_cooldown_s, f"/health: {exc!r}")
            return
        if resp.status_code != 200:
            worker.mark_down(self.config.unhealthy_cooldown_s, f"/health: {resp.status_code}")
            return
        with contextlib.suppress(ValueError):
            body = resp.json()
            if isinstance(body, dict) and isinstance(body.get("node_id"), str):
                worker.node_id = body["node_id"]
        if time.monotonic() >= worker.down_until:
            worker.mark_up()

    async def _probe_loop(self) -> None:
        # Every worker, healthy or not: the probes are also clock samples. One at a time,
        # so the probes do not queue behind each other on the router's event loop.
        while True:
            await asyncio.sleep(self.config.health_probe_interval_s)
            for worker in self._all_workers():
                with contextlib.suppress(Exception):
                    await self._probe(worker)

    # -- /health, /v1/models --

    def health(self) -> dict[str, Any]:
        counts = self.tracing.exporter_counts()
        return {
            "status": "ok",
            "node_id": self.tracing.node_id,
            "role": "router",
            "prefill": [w.snapshot() for w in self.prefill.workers],
            "decode": [w.snapshot() for w in self.decode.workers],
            "workers": [w.snapshot() for w in self.both.workers],
            "exporter": counts.to_dict() if counts is not None else None,
        }

    async def models(self, refresh: bool = False) -> dict[str, Any]:
        """The workers' ``/v1/models`` answer, cached for ``models_cache_ttl_s``."""
        fresh = time.monotonic() - self._models_at < self.config.models_cache_ttl_s
        if self._models is not None and fresh and not refresh:
            return self._models
        workers = sorted(
            self.decode.workers + self.prefill.workers + self.both.workers,
            key=lambda w: not w.healthy,
        )
        errors: list[str] = []
        for worker in workers:
            try:
                resp = await self.client.get(f"{worker.url}/v1/models")
                resp.raise_for_status()
                body = resp.json()
            except (httpx.HTTPError, ValueError) as exc:
                if isinstance(exc, _CONNECT_ERRORS):
                    worker.mark_down(self.config.unhealthy_cooldown_s, repr(exc))
                errors.append(f"{worker.url}: {exc!r}")
                continue
            if isinstance(body, dict) and isinstance(body.get("data"), list):
                self._models, self._models_at = body, time.monotonic()
                return body
            errors.append(f"{worker.url}: /v1/models answered without a 'data' list")
        if self._models is not None:  # stale beats nothing while workers restart
            return self._models
        raise _RouteError.make(502, "no worker answered /v1/models: " + "; ".join(errors))

    async def _check_model(self, model: str | None) -> None:
        if model is None:
            return
        try:
            ids = _model_ids(await self.models())
            if model not in ids:
                ids = _model_ids(await self.models(refresh=True))
        except _RouteError:
            return  # no worker reachable: prefill will report that with the worker's URL
        if model not in ids:
            raise _RouteError.make(
                404, f"The model `{model}` does not exist (served: {', '.join(ids)}).", "model"
            )

    # -- worker calls --

    async def _send(
        self,
        pool: WorkerPool,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        stream: bool,
    ) -> tuple[Lease, httpx.Response, int]:
        """Send to the best worker of ``pool``, moving on to the next one when a worker
        cannot be connected to. Returns the worker's lease (the caller releases it), its
        response (headers read) and when the request was sent (this router's wall
        clock, ns). Raises ``_RouteError`` (502) when no worker can be reached.
        """
        tried: set[str] = set()
        failures: list[str] = []
        content = json.dumps(body).encode()
        send_headers = {**headers, "content-type": "application/json", CLOCK_HEADER: "1"}
        while (worker := pool.pick(tried)) is not None:
            tried.add(worker.url)
            request = self.client.build_request(
                "POST", worker.url + path, content=content, headers=send_headers
            )
            lease = worker.lease()
            try:
                sent_ns = now_ns()
                resp = await self.client.send(request, stream=stream)
                worker.observe_clock(sent_ns, resp, now_ns())
            except BaseException as exc:
                lease.release()
                if isinstance(exc, _CONNECT_ERRORS):
                    worker.mark_down(self.config.unhealthy_cooldown_s, repr(exc))
                    failures.append(f"{worker.url} ({type(exc).__name__})")
                    continue
                if isinstance(exc, httpx.TimeoutException):
                    raise _RouteError.make(
                        504, f"{pool.role} worker {worker.url} timed out: {exc!r}"
                    ) from exc
                if isinstance(exc, httpx.HTTPError):
                    worker.mark_down(self.config.unhealthy_cooldown_s, repr(exc))
                    raise _RouteError.make(
                        502, f"{pool.role} worker {worker.url} failed: {exc!r}"
                    ) from exc
                raise
            worker.mark_up()
            return lease, resp, sent_ns
        raise _RouteError.make(
            502, f"no {pool.role} worker could be connected to: {', '.join(failures)}"
        )

    @staticmethod
    async def _relay_if_error(resp: httpx.Response) -> None:
        if resp.status_code < 400:
            return
        content = await resp.aread()
        await resp.aclose()
        media_type = resp.headers.get("content-type", "application/json")
        raise _RouteError(resp.status_code, content, media_type)

    async def _prefill(
        self, path: str, body: Mapping[str, Any], headers: dict[str, str], state: _RequestState
    ) -> Any:
        lease, resp, sent_ns = await self._send(
            self.prefill, path, prefill_request_body(body), headers, stream=False
        )
        worker = lease.worker
        try:
            _set_worker(state.span, A.PREFILL_NODE, A.PREFILL_URL, worker)
            state.span.set_attribute(A.PREFILL_SENT_NS, sent_ns)
            worker.annotate(state.span, A.PREFILL_CLOCK_OFFSET_S, A.PREFILL_CLOCK_ERROR_S)
            await self._relay_if_error(resp)
            try:
                answer = resp.json()
            except ValueError as exc:
                raise _RouteError.make(
                    502, f"prefill worker {worker.url} answered with invalid JSON"
                ) from exc
        finally:
            lease.release()
        if not isinstance(answer, dict):
            raise _RouteError.make(502, f"prefill worker {worker.url} answered a non-object")
        prompt_tokens = (answer.get("usage") or {}).get("prompt_tokens")
        if isinstance(prompt_tokens, int):
            state.input_tokens = prompt_tokens
        return answer.get("kv_transfer_params")

    # -- the request path --

    async def handle(self, request: Request, chat: bool) -> Response:
        arrival = arrival_s(request.scope)
        request_id = request.headers.get(REQUEST_ID_HEADER) or new_request_id()
        path = _CHAT if chat else _COMPLETIONS
        # The span starts at arrival, stamped before routing and body parsing.
        span = spans.start_request(
            self.tracing.tracer,
            extract(dict(request.headers)),
            wall_ns(arrival),
            request_id,
            chat=chat,
        )
        state = _RequestState(request_id, span, arrival, stream=False, metrics=self.metrics)
        reply_headers = {REQUEST_ID_HEADER: request_id}
        try:
            body = await self._parse(request)
            parsed = P.validate_request(body, chat)
            state.stream = parsed.stream
            span.set_attribute(A.STREAM, parsed.stream)
            span.set_attribute(A.GEN_AI_REQUEST_MAX_TOKENS, parsed.max_tokens)
            if parsed.model is not None:
                span.set_attribute(A.GEN_AI_REQUEST_MODEL, parsed.model)
                state.model = parsed.model
            await self._check_model(parsed.model)

            worker_headers = {REQUEST_ID_HEADER: request_id}
            inject(worker_headers, trace.set_span_in_context(span))
            if self.both.workers:
                pool, decode_body = self.both, aggregated_request_body(body, parsed.stream)
            else:
                kv_params = await self._prefill(path, body, worker_headers, state)
                pool, decode_body = self.decode, decode_request_body(body, kv_params, parsed.stream)
            lease, resp, sent_ns = await self._send(
                pool, path, decode_body, worker_headers, stream=parsed.stream
            )
            worker = lease.worker
            if pool is self.both:
                # One worker prefilled and decoded: it is both nodes of the request's row.
                # No prefill send time: that interval is not a dispatch here.
                _set_worker(span, A.PREFILL_NODE, A.PREFILL_URL, worker)
                worker.annotate(span, A.PREFILL_CLOCK_OFFSET_S, A.PREFILL_CLOCK_ERROR_S)
            _set_worker(span, A.DECODE_NODE, A.DECODE_URL, worker)
            span.set_attribute(A.DECODE_SENT_NS, sent_ns)
            worker.annotate(span, A.DECODE_CLOCK_OFFSET_S, A.DECODE_CLOCK_ERROR_S)
            if parsed.stream:
                try:
                    await self._relay_if_error(resp)
                except BaseException:
                    lease.release()
                    raise
                # The relay owns the lease from here.
                events = self._relay_stream(lease, resp, state, parsed.include_usage)
                return StreamingResponse(
                    events, media_type="text/event-stream", headers=reply_headers
                )
            try:
                await self._relay_if_error(resp)
                answer = _json_object(resp, worker)
            finally:
                lease.release()
            tokens = (answer.get("usage") or {}).get("completion_tokens")
            if isinstance(tokens, int):
                state.output_tokens = tokens
            if state.input_tokens is None:
                prompt_tokens = (answer.get("usage") or {}).get("prompt_tokens")
                if isinstance(prompt_tokens, int):
                    state.input_tokens = prompt_tokens
            state.finish_reasons = P.chunk_finish_reasons(answer)
            # The span ends once the body is sent: background tasks run after the response.
            return JSONResponse(
                answer, headers=reply_headers, background=BackgroundTask(state.finish)
            )
        except P.ProtocolError as exc:
            return self._fail(state, _RouteError(exc.status, exc.body()), reply_headers)
        except _RouteError as exc:
            return self._fail(state, exc, reply_headers)
        except Exception as exc:
            log.exception("request %s failed", request_id)
            error = _RouteError.make(500, f"router error: {exc!r}")
            return self._fail(state, error, reply_headers)

    @staticmethod
    def _fail(state: _RequestState, error: _RouteError, headers: Mapping[str, str]) -> Response:
        state.status = error.status
        state.error = error.message
        response = error.response(headers)
        response.background = BackgroundTask(state.finish)
        return response

    @staticmethod
    async def _parse(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _RouteError.make(400, f"the request body is not valid JSON: {exc}") from exc

    async def _relay_stream(
        self, lease: Lease, resp: httpx.Response, state: _RequestState, include_usage: bool
    ) -> AsyncIterator[bytes]:
        """Relay the decode worker's SSE events one by one as they arrive, each as it
        came: never added, split or merged. Owns ``resp``, the worker's lease and the
        span: all are released when it ends.

        The router always asks the worker for the usage chunk (for the token counts).
        When the client did not, that chunk is not passed on, and the finishing chunk,
        which vLLM sends with the stream's ``system_fingerprint`` when no usage chunk
        follows, waits for it (it comes right after) to take its fingerprint."""
        worker = lease.worker
        saw_done = False
        held: dict[str, Any] | None = None  # the finishing chunk, waiting for the usage one
        try:
            try:
                lines = P.sse_lines(resp.aiter_bytes())
                async for line in lines:
                    try:
                        event = P.parse_sse_data(line)
                    except ValueError:
                        log.warning("request %s: skipping bad SSE line %r", state.request_id, line)
                        continue
                    if event is None:
                        continue
                    if event == P.DONE:
                        saw_done = True
                        if held is not None:
                            yield P.sse_event(held)
                            state.wrote_chunk()
                            held = None
                        yield P.SSE_DONE
                        # End the client's response now: on a keep-alive connection its
                        # next request waits until this response is complete.
                        break
                    self._observe_chunk(event, state)
                    if "error" not in event and not include_usage and not event.get("choices"):
                        # The usage chunk the client did not ask for.
                        if held is not None and "system_fingerprint" in event:
                            held["system_fingerprint"] = event["system_fingerprint"]
                        continue
                    if not include_usage and P.chunk_finish_reasons(event):
                        held = event
                        continue
                    out = (line.strip() + "\n\n").encode()
                    if held is not None:
                        yield P.sse_event(held)
                        state.wrote_chunk()
                        held = None
                    yield out
                    if event.get("choices"):
                        state.wrote_chunk()
            except httpx.HTTPError as exc:
                if held is not None:
                    yield P.sse_event(held)
                message = f"{worker.role} worker {worker.url} stream broke: {exc!r}"
                worker.mark_down(self.config.unhealthy_cooldown_s, repr(exc))
                state.error, state.status = message, 502
                yield P.sse_error(P.error_body(message, P.error_type(502), 502))
                yield P.SSE_DONE
                return
            if not saw_done and state.error is None:
                if held is not None:
                    yield P.sse_event(held)
                message = f"{worker.role} worker {worker.url} ended the stream without [DONE]"
                state.error, state.status = message, 502
                yield P.sse_error(P.error_body(message, P.error_type(502), 502))
                yield P.SSE_DONE
        except (asyncio.CancelledError, GeneratorExit):
            if state.error is None:
                state.error, state.status = "client disconnected", 499
            raise
        finally:
            lease.release()
            state.finish()
            if saw_done:
                # Read the stream's end in the background so the connection goes back
                # to the pool without holding up the client's response.
                task = asyncio.create_task(_drain(resp, lines))
                self._drains.add(task)
                task.add_done_callback(self._drains.discard)
            else:
                # Shielded: under cancellation (client gone) every unshielded await
                # re-raises. Closing the stream tells the decode worker to stop.
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await resp.aclose()

    @staticmethod
    def _observe_chunk(event: dict[str, Any], state: _RequestState) -> None:
        """Record what a chunk says about the request."""
        if "error" in event:
            error = event.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            state.error = str(message or error)
            state.status = 502
            return
        state.finish_reasons.extend(P.chunk_finish_reasons(event))
        usage = event.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("completion_tokens"), int):
                state.output_tokens = usage["completion_tokens"]
            if state.input_tokens is None and isinstance(usage.get("prompt_tokens"), int):
                state.input_tokens = usage["prompt_tokens"]


async def _drain(resp: httpx.Response, lines: AsyncIterator[str], timeout_s: float = 10.0) -> None:
    """Read what is left of a finished stream (normally only its terminator) from the
    iterator that was reading it, then close: the connection goes back to the pool."""
    try:
        async with asyncio.timeout(timeout_s):
            async for _ in lines:
                pass
    except (httpx.HTTPError, TimeoutError):
        pass
    except Exception:  # never let a background drain raise unobserved
        log.debug("draining a finished stream failed", exc_info=True)
    finally:
        await resp.aclose()


def _set_worker(span: trace.Span, node_attr: str, url_attr: str, worker: Worker) -> None:
    """The chosen worker's URL, and its node id when its /health named one (a stock vLLM
    server's does not: its own spans carry its node id)."""
    span.set_attribute(url_attr, worker.url)
    if worker.node_id:
        span.set_attribute(node_attr, worker.node_id)


def _model_ids(models: Mapping[str, Any]) -> list[str]:
    return [m["id"] for m in models.get("data", []) if isinstance(m, dict) and "id" in m]


def _json_object(resp: httpx.Response, worker: Worker) -> dict[str, Any]:
    try:
        answer = resp.json()
    except ValueError as exc:
        raise _RouteError.make(
            502, f"{worker.role} worker {worker.url} answered with invalid JSON"
        ) from exc
    if not isinstance(answer, dict):
        raise _RouteError.make(502, f"{worker.role} worker {worker.url} answered a non-object")
    return answer


# -- the app -------------------------------------------------------------------------


def create_app(config: RouterConfig, tracing: Tracing | None = None) -> FastAPI:
    """The router's ASGI app. Worker connections and the health prober live in the app's
    lifespan. ``tracing`` defaults to ``setup_tracing("router", config.node_id,
    config.otlp_endpoint)``; the app shuts it down when the lifespan ends."""
    config.validate()
    router = _Router(
        config, tracing or setup_tracing("router", config.node_id, config.otlp_endpoint)
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await router.start()
        try:
            yield
        finally:
            await router.shutdown()

    app = FastAPI(title="tokentrace router", lifespan=lifespan)
    app.add_middleware(ArrivalStampMiddleware, node_id=router.tracing.node_id)
    if config.auth_token:
        app.add_middleware(BearerAuthMiddleware, token=config.auth_token)
    app.state.router = router

    @app.post(_COMPLETIONS)
    async def completions(request: Request) -> Response:
        return await router.handle(request, chat=False)

    @app.post(_CHAT)
    async def chat_completions(request: Request) -> Response:
        return await router.handle(request, chat=True)

    @app.get("/v1/models")
    async def models() -> Response:
        try:
            return JSONResponse(await router.models())
        except _RouteError as exc:
            return exc.response({})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return router.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format: TTFT, TPOT, e2e and requests by status (see
        :mod:`tokentrace.instrument.metrics` for who observes what)."""
        return Response(router.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return app


def run(config: RouterConfig) -> None:
    """Serve the router with uvicorn (HTTPS with ``config.tls``) until interrupted. Blocks."""
    app = create_app(config)
    tls = config.tls
    serve(
        app,
        config.host,
        config.port,
        log_level="info",
        access_log=False,
        ssl_certfile=tls.cert_file if tls else None,
        ssl_keyfile=tls.key_file if tls else None,
    )
