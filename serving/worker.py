"""A prefill or decode worker: vLLM's OpenAI-compatible API over the reference engine.

It speaks vLLM's disaggregation protocol, so the router drives it exactly as it drives
a vLLM server with the NixlConnector:

- a request with ``kv_transfer_params.do_remote_decode`` is prefilled here; the
  prompt's KV blocks stay pinned until the decode side has read them (it sends a NIXL
  notification) or ``kv_timeout_s`` passes, and the response carries the
  ``kv_transfer_params`` the decode side needs (``remote_block_ids``,
  ``remote_engine_id``, ``remote_host``/``remote_port`` for the handshake, and a
  ``traceparent``);
- a request with ``kv_transfer_params.do_remote_prefill`` reads those blocks through
  NIXL into local blocks and decodes with continuous batching;
- a request with neither is prefilled and decoded here: on a ``prefill`` or ``decode``
  worker by a blocking prefill before it joins the decode batch; on a ``both`` worker
  (an aggregated deployment) inside an engine step shared with the running decodes
  (piggy-backed prefill), so their token emissions show the prefill work they waited
  for in ``tokentrace.step.prefill_tokens``.

Spans: ``llm.prefill`` (SERVER) where the prompt is computed, ``llm.kv_transfer``
(CLIENT) on the reader, ``llm.decode`` (SERVER) and one ``llm.token`` per emission
where tokens are generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from opentelemetry.context import Context

from tokentrace import __version__
from tokentrace.instrument import (
    ArrivalStampMiddleware,
    ServingMetrics,
    TokenRecorder,
    Tracing,
    arrival_s,
    extract,
    inject,
    setup_tracing,
    spans,
    wall_ns,
)
from tokentrace.instrument.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tokentrace.runtime.layout import default_data_dir, models_dir
from tokentrace.schemas import attributes as A
from tokentrace.serving import openai_protocol as oai
from tokentrace.serving.engine import (
    BlockPool,
    ByteTokenizer,
    DecodeRequest,
    Engine,
    OutOfBlocksError,
    load_or_create,
)
from tokentrace.serving.kv import KVRegion, KVTransferError, NixlKVEndpoint
from tokentrace.serving.serve import CLIENT_KEEPALIVE_S, serve
from tokentrace.serving.stream_shape import OutputText, StreamShaper

log = logging.getLogger(__name__)

WORKER_ROLES = ("prefill", "decode", "both")
KV_BACKEND = "nixl/UCX"


@dataclass(frozen=True)
class WorkerConfig:
    role: str
    host: str = "127.0.0.1"
    port: int = 8100
    node_id: str | None = None
    otlp_endpoint: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    model: str = "tt-tiny"
    num_blocks: int = 1024
    kv_timeout_s: float = 120.0
    threads: int = 1
    token_spans: str | None = None  # "packed" | "spans"; None: the environment's choice

    def validate(self) -> None:
        if self.role not in WORKER_ROLES:
            raise ValueError(f"role must be one of {WORKER_ROLES}, got {self.role!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port!r}")
        if self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks!r}")
        if self.kv_timeout_s <= 0:
            raise ValueError(f"kv_timeout_s must be positive, got {self.kv_timeout_s!r}")
        if self.threads <= 0:
            raise ValueError(f"threads must be positive, got {self.threads!r}")


class _Finish:
    __slots__ = ("reason", "error")

    def __init__(self, reason: str, error: BaseException | None) -> None:
        self.reason = reason
        self.error = error


class _Step:
    """One engine step's output for a request, as the engine reported it."""

    __slots__ = ("token_ids", "step", "batch_size", "prefill_tokens", "finish")

    def __init__(
        self, token_ids: list[int], step: int, batch_size: int, prefill: int, finish: str | None
    ) -> None:
        self.token_ids = token_ids
        self.step = step
        self.batch_size = batch_size
        self.prefill_tokens = prefill
        self.finish = finish


@dataclass
class _Pinned:
    block_ids: list[int]
    deadline: float


class Worker:
    """The engine, KV pool, NIXL endpoint and tracer of one worker process.

    Threading: HTTP handlers run on the asyncio loop; engine compute on the engine's
    thread (decode loop) or a pool thread (prefill); NIXL notifications on the
    endpoint's loop thread. ``_pinned`` is shared between them under ``_lock``.
    """

    def __init__(self, config: WorkerConfig) -> None:
        config.validate()
        self.config = config
        self.tracing: Tracing = setup_tracing(
            role=config.role,
            node_id=config.node_id,
            endpoint=config.otlp_endpoint,
            token_spans=config.token_spans,
        )
        self.node_id = self.tracing.node_id
        import torch

        torch.set_num_threads(config.threads)
        self.model = load_or_create(models_dir(config.data_dir), config.model)
        self.model_config = self.model.config
        self.tokenizer = ByteTokenizer()
        self.pool = BlockPool(self.model_config, config.num_blocks)
        self.engine = Engine(self.model, self.pool)
        self.metrics = ServingMetrics(self.node_id, config.role)
        self.metrics.track_engine(
            config.model, lambda: self.engine.num_waiting, lambda: self.engine.num_running
        )
        self.kv = NixlKVEndpoint(f"{self.node_id}-{uuid.uuid4().hex[:8]}", self.pool.tensor)
        self._lock = threading.Lock()
        self._pinned: dict[str, _Pinned] = {}
        self._regions: dict[str, KVRegion] = {}
        self._http: httpx.AsyncClient | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.created = int(time.time())
        # What vLLM puts in system_fingerprint: the server's version and configuration.
        self.fingerprint = (
            f"tokentrace-{__version__}-"
            + hashlib.sha256(repr((config.model, self.model_config)).encode()).hexdigest()[:8]
        )

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self.engine.start()
        self.kv.start_notification_loop(self._on_notif, self._has_pinned)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0), limits=httpx.Limits(keepalive_expiry=CLIENT_KEEPALIVE_S)
        )
        self._reaper = asyncio.create_task(self._reap_expired())

    async def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        self.engine.shutdown()
        self.kv.close()
        self.tracing.shutdown()

    # -- pinned prefill blocks (target side of transfers) ----------------------------
    def _has_pinned(self) -> bool:
        return bool(self._pinned)

    def _on_notif(self, msg: bytes) -> None:
        text = msg.decode("utf-8", "replace")
        if not text.startswith("done:"):
            log.warning("ignoring unexpected NIXL notification %r", text[:80])
            return
        self._release(text[5:])

    def _release(self, transfer_id: str) -> None:
        with self._lock:
            pinned = self._pinned.pop(transfer_id, None)
        if pinned is not None:
            self.pool.free(pinned.block_ids)

    async def _reap_expired(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            with self._lock:
                expired = [k for k, p in self._pinned.items() if p.deadline < now]
            for key in expired:
                log.warning("KV blocks of transfer %s were not read in time; freeing", key)
                self._release(key)

    # -- requests -------------------------------------------------------------------
    def models_body(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.config.model,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "tokentrace",
                    "root": self.config.model,
                    "max_model_len": self.model_config.max_seq_len,
                }
            ],
        }

    def _check(self, parsed: oai.ParsedRequest) -> list[int]:
        if parsed.model is not None and parsed.model != self.config.model:
            raise oai.ProtocolError(404, f"The model `{parsed.model}` does not exist.", "model")
        prompt_ids = self.tokenizer.encode(parsed.prompt_text)
        if not prompt_ids:
            raise oai.ProtocolError(400, "The prompt is empty.", "prompt")
        limit = self.model_config.max_seq_len
        if len(prompt_ids) + parsed.max_tokens > limit:
            raise oai.ProtocolError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {len(prompt_ids) + parsed.max_tokens} tokens "
                f"({len(prompt_ids)} in the prompt, {parsed.max_tokens} for the completion).",
                "prompt",
            )
        return prompt_ids

    async def handle(self, request: Request, chat: bool) -> Response:
        try:
            body = await request.json()
        except Exception as exc:
            return _error(oai.ProtocolError(400, f"Request body is not valid JSON: {exc}"))
        try:
            parsed = oai.validate_request(body, chat=chat)
            prompt_ids = self._check(parsed)
        except oai.ProtocolError as exc:
            return _error(exc)
        request_id = request.headers.get("x-request-id") or f"cmpl-{uuid.uuid4().hex}"
        header_ctx = extract(dict(request.headers))
        arrival = arrival_s(request.scope)
        kv = parsed.kv_transfer_params or {}
        if kv.get("do_remote_decode"):
            return await self._prefill_for_remote(
                parsed, prompt_ids, request_id, header_ctx, chat, arrival
            )
        if kv.get("do_remote_prefill"):
            parent = header_ctx if _has_span(header_ctx) else extract(kv)
            return await self._decode(parsed, prompt_ids, request_id, parent, chat, kv, arrival)
        return await self._decode(parsed, prompt_ids, request_id, header_ctx, chat, None, arrival)

    def _request_attrs(self, parsed: oai.ParsedRequest, request_id: str, n: int) -> dict[str, Any]:
        return spans.request_attributes(
            request_id, n, max_tokens=parsed.max_tokens, model=self.config.model
        )

    async def _run_prefill(
        self, prompt_ids: list[int], parent: Context, attrs: dict[str, Any], arrival: float
    ) -> tuple[list[int], int, trace.Span]:
        """Compute the prompt's KV under an ``llm.prefill`` span that starts at
        ``arrival`` (monotonic seconds) and is ended by the caller."""
        span = spans.start_prefill(self.tracing.tracer, parent, wall_ns(arrival), attrs)
        started: list[float] = []

        def run() -> Any:
            started.append(time.monotonic())
            return self.engine.prefill(prompt_ids)

        try:
            result = await asyncio.to_thread(run)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR, str(exc))
            span.end()
            raise
        done = time.monotonic()
        spans.set_stage_times(span, started[0] - arrival, done - started[0])
        return list(result.block_ids), int(result.next_token), span

    async def _prefill_for_remote(
        self,
        parsed: oai.ParsedRequest,
        prompt_ids: list[int],
        request_id: str,
        parent: Context,
        chat: bool,
        arrival: float,
    ) -> Response:
        attrs = self._request_attrs(parsed, request_id, len(prompt_ids))
        try:
            block_ids, next_token, span = await self._run_prefill(
                prompt_ids, parent, attrs, arrival
            )
        except OutOfBlocksError as exc:
            return _error(oai.ProtocolError(503, f"KV cache full: {exc}"))
        transfer_id = uuid.uuid4().hex
        with self._lock:
            self._pinned[transfer_id] = _Pinned(
                block_ids, time.monotonic() + self.config.kv_timeout_s
            )
        kv_params: dict[str, Any] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": block_ids,
            "remote_engine_id": self.kv.region().agent_name,
            "remote_host": self.config.host,
            "remote_port": self.config.port,
            "remote_request_id": transfer_id,
            "remote_node_id": self.node_id,
            "tp_size": 1,
        }
        inject(kv_params, trace.set_span_in_context(span))
        span.set_attribute(A.GEN_AI_USAGE_OUTPUT_TOKENS, 1)
        span.end()
        make = oai.chat_response if chat else oai.completion_response
        body = make(
            request_id,
            self.config.model,
            self.tokenizer.decode([next_token]),
            "length",
            len(prompt_ids),
            1,
            kv_transfer_params=kv_params,
            fingerprint=self.fingerprint,
        )
        return JSONResponse(body, headers={"X-Request-Id": request_id})

    async def _region(self, kv: dict[str, Any]) -> KVRegion:
        engine_id = str(kv.get("remote_engine_id"))
        region = self._regions.get(engine_id)
        if region is not None:
            return region
        url = f"http://{kv.get('remote_host')}:{kv.get('remote_port')}/v1/kv/region"
        assert self._http is not None
        try:
            resp = await self._http.get(url)
            resp.raise_for_status()
            region = KVRegion.from_dict(resp.json())
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise KVTransferError(f"KV handshake with {url} failed: {exc}") from exc
        self._regions[region.agent_name] = region
        return region

    async def _pull_kv(
        self, kv: dict[str, Any], prompt_ids: list[int], decode_ctx: Context
    ) -> list[int]:
        """Read the prompt's blocks from the prefill node into new local blocks,
        under an ``llm.kv_transfer`` span. Returns the local block ids."""
        need = self.pool.blocks_for(len(prompt_ids))
        remote_ids = kv.get("remote_block_ids")
        if not isinstance(remote_ids, list) or len(remote_ids) != need:
            got = len(remote_ids) if isinstance(remote_ids, list) else remote_ids
            raise oai.ProtocolError(
                400,
                f"kv_transfer_params.remote_block_ids must list {need} blocks for a "
                f"{len(prompt_ids)}-token prompt, got {got!r}",
                "kv_transfer_params",
            )
        src_node = str(kv.get("remote_node_id") or kv.get("remote_engine_id"))
        links = []
        prefill_span = trace.get_current_span(extract(kv)).get_span_context()
        if prefill_span.is_valid:
            links.append(trace.Link(prefill_span))
        local_ids = self.pool.allocate(need)
        notif = f"done:{kv.get('remote_request_id')}".encode()
        start_ns = time.time_ns()
        error: BaseException | None = None
        moved, blocks, backend = 0, need, KV_BACKEND
        try:
            region = await self._region(kv)
            result = await asyncio.to_thread(
                self.kv.read_blocks, region, [int(b) for b in remote_ids], local_ids, notif
            )
            start_ns, end_ns = result.start_ns, result.end_ns
            moved, blocks, backend = result.bytes, result.blocks, result.backend
        except BaseException as exc:
            self.pool.free(local_ids)
            error, end_ns = exc, time.time_ns()
        # Before the span ends, so a transfer whose row is stored is always counted.
        self.metrics.observe_kv_transfer(
            self.config.model, error is None, (end_ns - start_ns) / 1e9, moved
        )
        spans.kv_transfer(
            self.tracing.tracer,
            decode_ctx,
            start_ns,
            end_ns,
            bytes_moved=moved,
            blocks=blocks,
            backend=backend,
            src_node=src_node,
            dst_node=self.node_id,
            links=links,
            error=error,
        )
        if error is not None:
            raise error
        return local_ids

    async def _decode(
        self,
        parsed: oai.ParsedRequest,
        prompt_ids: list[int],
        request_id: str,
        parent: Context,
        chat: bool,
        kv: dict[str, Any] | None,
        arrival: float,
    ) -> Response:
        attrs = self._request_attrs(parsed, request_id, len(prompt_ids))
        span = spans.start_decode(self.tracing.tracer, parent, wall_ns(arrival), attrs)
        gen = _Generation(self, parsed, prompt_ids, request_id, span, attrs, arrival)
        prefill_in_step = kv is None and self.config.role == "both"
        try:
            if kv is not None:
                block_ids = await self._pull_kv(kv, prompt_ids, gen.ctx)
            elif prefill_in_step:
                block_ids = []
            else:
                block_ids, _, prefill_span = await self._run_prefill(
                    prompt_ids, gen.ctx, attrs, time.monotonic()
                )
                prefill_span.end()
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR, str(exc))
            span.end()
            if isinstance(exc, oai.ProtocolError):
                return _error(exc)
            if isinstance(exc, OutOfBlocksError):
                return _error(oai.ProtocolError(503, f"KV cache full: {exc}"))
            if isinstance(exc, KVTransferError):
                return _error(
                    oai.ProtocolError(502, f"KV transfer failed: {exc}", "kv_transfer_params")
                )
            raise
        try:
            gen.submit(block_ids, prefill_in_step)
        except ValueError as exc:  # the engine refused it: the blocks are still ours
            self.pool.free(block_ids)
            span.set_status(trace.StatusCode.ERROR, str(exc))
            span.end()
            return _error(oai.ProtocolError(400, str(exc)))
        if not parsed.stream:
            return await gen.respond(chat)
        return StreamingResponse(
            gen.stream(chat), media_type="text/event-stream", headers={"X-Request-Id": request_id}
        )


class _Generation:
    """One request's decoding on the engine, from submission to its last chunk: the
    engine's steps arrive on the engine thread and are queued for the event loop; each
    emission is recorded right before the client gets it; the spans are built after the
    response, off the event loop."""

    def __init__(
        self,
        worker: Worker,
        parsed: oai.ParsedRequest,
        prompt_ids: list[int],
        request_id: str,
        span: trace.Span,
        attrs: dict[str, Any],
        arrival: float,
    ) -> None:
        self.worker = worker
        self.parsed = parsed
        self.prompt_ids = prompt_ids
        self.request_id = request_id
        self.span = span
        self.ctx = trace.set_span_in_context(span)
        self.attrs = attrs
        self.arrival = arrival
        self.engine_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        self.queue: asyncio.Queue[_Step | _Finish] = asyncio.Queue()
        # The ITL histogram needs the emission times even when tracing is off.
        self.recorder = TokenRecorder(parsed.max_tokens + 1)
        self.out = _Output()
        self.text = OutputText(parsed.stop, parsed.include_stop_str_in_output)
        # (started_ns, done_ns) of an in-step prefill, set on the engine thread.
        self.prefilled: list[tuple[int, int]] = []

    def submit(self, block_ids: list[int], prefill_in_step: bool) -> None:
        """Hand the request to the engine; ValueError if it refuses it."""
        loop = asyncio.get_running_loop()
        queue = self.queue

        def on_tokens(
            token_ids: list[int], step: int, batch_size: int, prefill: int, finish: str | None
        ) -> None:
            loop.call_soon_threadsafe(
                queue.put_nowait, _Step(token_ids, step, batch_size, prefill, finish)
            )

        def on_finish(reason: str, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, _Finish(reason, error))

        parsed = self.parsed
        self.recorder.start()
        self.worker.engine.submit(
            DecodeRequest(
                request_id=self.engine_id,
                prompt_ids=self.prompt_ids,
                block_ids=block_ids,
                max_tokens=parsed.max_tokens,
                ignore_eos=parsed.ignore_eos,
                temperature=parsed.temperature,
                seed=parsed.seed,
                prefill_in_step=prefill_in_step,
                on_tokens=on_tokens,
                on_finish=on_finish,
                on_prefill=lambda started_ns, done_ns: self.prefilled.append((started_ns, done_ns)),
            )
        )

    async def steps(self) -> AsyncIterator[tuple[_Step, str]]:
        """The request's engine steps, each with the text it adds for the client, until
        one finishes it (``out.reason`` set) or the engine ends it."""
        out = self.out
        while out.reason is None:
            item = await self.queue.get()
            if isinstance(item, _Finish):  # ended with no finishing step
                out.reason = item.reason
                if item.error is not None:
                    out.error = f"engine error: {item.error}"
                return
            out.tokens += len(item.token_ids)
            delta = self.text.add(
                self.worker.tokenizer.decode(item.token_ids), item.finish is not None
            )
            if delta.stop is not None:
                out.reason, out.stop_reason = "stop", delta.stop
                self.worker.engine.abort(self.engine_id)  # its later steps go unread
            else:
                out.reason = item.finish
            yield item, delta.text

    async def respond(self, chat: bool) -> Response:
        """The whole completion as one JSON response."""
        out = self.out
        try:
            async for item, _ in self.steps():
                self.recorder.record(
                    len(item.token_ids), item.step, item.batch_size, item.prefill_tokens
                )
        finally:
            if out.reason is None:
                self.worker.engine.abort(self.engine_id)
            self.worker.tracing.defer(functools.partial(self.finish_spans, time.time_ns()))
        if out.error is not None:
            return _error(oai.ProtocolError(500, out.error))
        make = oai.chat_response if chat else oai.completion_response
        body = make(
            self.request_id,
            self.worker.config.model,
            self.text.text,
            out.reason,
            len(self.prompt_ids),
            out.tokens,
            stop_reason=out.stop_reason,
            fingerprint=self.worker.fingerprint,
        )
        return JSONResponse(body, headers={"X-Request-Id": self.request_id})

    async def stream(self, chat: bool) -> AsyncIterator[bytes]:
        """The completion as server-sent events, shaped as vLLM shapes them."""
        out = self.out
        shaper = StreamShaper(
            chat=chat,
            request_id=self.request_id,
            model=self.worker.config.model,
            include_usage=self.parsed.include_usage,
            fingerprint=self.worker.fingerprint,
        )
        try:
            async for item, delta in self.steps():
                for event in self._emit(shaper, item, delta):
                    yield event
            if out.error is not None:
                yield oai.sse_error(oai.ProtocolError(500, out.error).body())
                yield oai.SSE_DONE
                return
            if not shaper.finished:  # the engine aborted it (shutting down)
                for event in self._emit(shaper, None, ""):
                    yield event
            for tail in shaper.end(len(self.prompt_ids), out.tokens):
                yield oai.sse_event(tail)
        finally:
            if not shaper.finished:  # the client went away: stop generating, free blocks
                self.worker.engine.abort(self.engine_id)
            # Spans are built after the response's last bytes, off the event loop.
            self.worker.tracing.defer(functools.partial(self.finish_spans, time.time_ns()))

    def _emit(self, shaper: StreamShaper, item: _Step | None, delta: str) -> Iterator[bytes]:
        """The step's chunks, each recorded as an emission right before it goes out: what
        the client will time is what is stored."""
        out = self.out
        finish = out.reason if item is None or out.reason is not None else None
        stop = out.stop_reason if finish == "stop" else None
        step, batch, prefill = (
            (item.step, item.batch_size, item.prefill_tokens) if item else (-1, 0, 0)
        )
        tokens = len(item.token_ids) if item else 0
        for chunk, carries in shaper.output(delta, finish, stop):
            self.recorder.record(tokens if carries else 0, step, batch, prefill)
            yield oai.sse_event(chunk)

    def finish_spans(self, end_ns: int) -> None:
        """Observe the emissions, then build the token spans (or packed emissions), the
        in-step prefill span if there was one, and end ``llm.decode``."""
        worker, recorder, out = self.worker, self.recorder, self.out
        # Before the spans end, so an emission whose row is stored is always counted.
        worker.metrics.observe_emissions(worker.config.model, recorder)
        ttft_s = None
        if worker.tracing.enabled:
            recorder.emit(worker.tracing.tracer, self.span, worker.tracing.packed)
            first = recorder.first_emission_s()
            if first is not None:
                ttft_s = recorder.start_mono_ns / 1e9 - self.arrival + first
        if self.prefilled:
            # A prompt prefilled inside an engine step: arrival → KV ready, as on a
            # prefill worker, so requests.prefill_s means the same in both deployments.
            started_ns, done_ns = self.prefilled[0]
            spans.ended_prefill(
                worker.tracing.tracer,
                self.ctx,
                self.attrs,
                wall_ns(self.arrival),
                wall_ns(started_ns / 1e9),
                wall_ns(done_ns / 1e9),
            )
        spans.end_decode(
            self.span,
            output_tokens=out.tokens,
            finish_reason=out.reason or "abort",
            ttft_s=ttft_s,
            error=out.error,
            end_ns=end_ns,
        )


@dataclass
class _Output:
    tokens: int = 0
    reason: str | None = None
    stop_reason: str | None = None
    error: str | None = None


def _has_span(ctx: Context) -> bool:
    return trace.get_current_span(ctx).get_span_context().is_valid


def _error(exc: oai.ProtocolError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def create_app(config: WorkerConfig) -> FastAPI:
    """The worker's ASGI app; the engine starts with the app's lifespan."""
    worker = Worker(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await worker.start()
        try:
            yield
        finally:
            await worker.shutdown()

    app = FastAPI(title=f"tokentrace {config.role} worker", lifespan=lifespan)
    app.add_middleware(ArrivalStampMiddleware, node_id=worker.node_id)
    app.state.worker = worker

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, the KV pool, and ``exporter``: what this process's span exporter has
        queued, exported and dropped (null when tracing is off)."""
        counts = worker.tracing.exporter_counts()
        return {
            "status": "ok",
            "role": config.role,
            "node_id": worker.node_id,
            "model": config.model,
            "free_blocks": worker.pool.num_free,
            "pinned_transfers": len(worker._pinned),
            "exporter": counts.to_dict() if counts is not None else None,
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format: ITL, KV transfers read here, queue depth and running
        batch size (see :mod:`tokentrace.instrument.metrics` for who observes what)."""
        return Response(worker.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return worker.models_body()

    @app.get("/v1/kv/region")
    async def kv_region() -> dict[str, Any]:
        return worker.kv.region().to_dict()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await worker.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await worker.handle(request, chat=True)

    return app


def run(config: WorkerConfig) -> None:
    """Serve until interrupted (blocking)."""
    app = create_app(config)
    worker: Worker = app.state.worker
    print(
        f"tokentrace worker ready role={config.role} node={worker.node_id} "
        f"url=http://{config.host}:{config.port} model={config.model}",
        flush=True,
    )
    serve(app, config.host, config.port, log_level="warning")
