"""The router end to end against stub OpenAI workers on loopback ports chosen at run time.

The stubs speak just enough of the worker protocol (``/health``, ``/v1/models``, prefill
JSON with ``kv_transfer_params``, decode SSE) to exercise orchestration, relaying, error
handling and the ``llm.request`` span; the real workers are tested elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from tokentrace.instrument import Tracing
from tokentrace.schemas import attributes as A
from tokentrace.serving import openai_protocol as P
from tokentrace.serving.router import RouterConfig, create_app
from tokentrace.serving.stream_shape import StreamShaper

MODEL = "stub-model"
KV = {"remote_engine_id": "engine-p", "remote_block_ids": [3, 4], "remote_host": "p", "x": 1}
FINGERPRINT = "stub-fingerprint"


@dataclass
class StubWorker:
    role: str
    break_after: int | None = None  # decode: drop the connection after this many tokens
    fail_status: int | None = None  # answer completions with this error status
    tail_delay_s: float = 0.0  # decode: wait this long between the last chunk and usage
    seen: list[dict[str, Any]] = field(default_factory=list)  # {"body", "headers"}

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict[str, Any]:
            return {"status": "ok", "node_id": f"{self.role}-node"}

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._complete(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._complete(request, chat=True)

        return app

    async def _complete(self, request: Request, chat: bool) -> Response:
        body = await request.json()
        self.seen.append({"body": body, "headers": dict(request.headers)})
        if self.fail_status is not None:
            error = P.error_body("stub says no", P.error_type(self.fail_status), self.fail_status)
            return JSONResponse(error, status_code=self.fail_status)
        parsed = P.validate_request(body, chat)
        prompt_tokens = len(parsed.prompt_text)
        if self.role == "prefill":
            make = P.chat_response if chat else P.completion_response
            return JSONResponse(make("id-p", MODEL, "x", "length", prompt_tokens, 1, None, KV))
        n = parsed.max_tokens
        if not parsed.stream:
            make = P.chat_response if chat else P.completion_response
            return JSONResponse(make("id-d", MODEL, "y" * n, "length", prompt_tokens, n))

        async def events() -> AsyncIterator[bytes]:
            # Shaped as vLLM shapes it (the role chunk, finish on the last step's chunk).
            shaper = StreamShaper(
                chat=chat,
                request_id="id-d",
                model=MODEL,
                include_usage=parsed.include_usage,
                fingerprint=FINGERPRINT,
            )
            for i in range(n):
                if self.break_after is not None and i == self.break_after:
                    raise RuntimeError("stub decode worker dies mid-stream")
                last = "length" if i == n - 1 else None
                for chunk, _ in shaper.output("y", last):
                    yield P.sse_event(chunk)
                await asyncio.sleep(0.002)
            await asyncio.sleep(self.tail_delay_s)
            for tail in shaper.end(prompt_tokens, n):
                yield P.sse_event(tail)

        return StreamingResponse(events(), media_type="text/event-stream")


class Served:
    """An ASGI app served by uvicorn on a loopback port in a background thread."""

    def __init__(self, app: FastAPI) -> None:
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only
        # then, and without it Nagle + delayed ACK bunch stream chunks by ~40 ms.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, args=([self.sock],), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def _free_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@dataclass
class Stack:
    router: str
    prefill: StubWorker
    decode: StubWorker
    spans: InMemorySpanExporter
    client: httpx.Client

    def request_spans(self) -> list[Any]:
        deadline = time.monotonic() + 5
        while True:
            spans = [s for s in self.spans.get_finished_spans() if s.name == A.SPAN_REQUEST]
            if spans or time.monotonic() > deadline:
                return spans
            time.sleep(0.01)


def _stack(prefill: StubWorker, decode: StubWorker, dead_prefill: bool = False) -> Iterator[Stack]:
    workers = [Served(prefill.app()), Served(decode.app())]
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing("router-node", "router", "tokentrace-router", None, provider.get_tracer("t"))
    prefill_urls = [workers[0].url]
    if dead_prefill:
        prefill_urls.insert(0, _free_url())
    config = RouterConfig(prefill_urls=prefill_urls, decode_urls=[workers[1].url], port=0)
    router = Served(create_app(config, tracing=tracing))
    client = httpx.Client(base_url=router.url, timeout=30)
    try:
        yield Stack(router.url, prefill, decode, exporter, client)
    finally:
        client.close()
        router.stop()
        for w in workers:
            w.stop()
        provider.shutdown()


@pytest.fixture
def stack() -> Iterator[Stack]:
    yield from _stack(StubWorker("prefill"), StubWorker("decode"))


def _events(text: str) -> list[Any]:
    out = []
    for line in text.splitlines():
        event = P.parse_sse_data(line)
        if event is not None:
            out.append(event)
    return out


def test_streaming_completion_runs_prefill_then_decode(stack: Stack) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "stream": True}
    resp = stack.client.post(
        "/v1/completions", json=body, headers={"X-Request-Id": "req-1", "traceparent": traceparent}
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-request-id"] == "req-1"
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = _events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(P.chunk_text(c) for c in chunks) == "yyyy"
    assert all(c["choices"] for c in chunks)  # the usage chunk the client did not ask for is gone

    (p,) = stack.prefill.seen
    assert p["body"]["max_tokens"] == 1 and p["body"]["stream"] is False
    assert p["body"]["kv_transfer_params"]["do_remote_decode"] is True
    assert p["headers"]["x-request-id"] == "req-1"
    (d,) = stack.decode.seen
    assert d["body"]["kv_transfer_params"] == KV
    assert d["body"]["stream_options"] == {"include_usage": True}
    assert d["headers"]["x-request-id"] == "req-1"
    trace_id = traceparent.split("-")[1]
    assert p["headers"]["traceparent"].split("-")[1] == trace_id
    assert d["headers"]["traceparent"] == p["headers"]["traceparent"]

    (span,) = stack.request_spans()
    attrs = dict(span.attributes)
    assert format(span.context.trace_id, "032x") == trace_id
    assert d["headers"]["traceparent"].split("-")[2] == format(span.context.span_id, "016x")
    assert attrs[A.GEN_AI_OPERATION_NAME] == "text_completion"
    assert attrs[A.GEN_AI_REQUEST_MODEL] == MODEL
    assert attrs[A.REQUEST_ID] == "req-1"
    assert attrs[A.STREAM] is True
    assert attrs[A.GEN_AI_REQUEST_MAX_TOKENS] == 4
    assert attrs[A.GEN_AI_USAGE_INPUT_TOKENS] == 5
    assert attrs[A.GEN_AI_USAGE_OUTPUT_TOKENS] == 4
    assert tuple(attrs[A.GEN_AI_RESPONSE_FINISH_REASONS]) == ("length",)
    assert attrs[A.HTTP_STATUS] == 200
    assert attrs[A.PREFILL_NODE] == "prefill-node" and attrs[A.DECODE_NODE] == "decode-node"
    ttft = attrs[A.GEN_AI_SERVER_TTFT]
    e2e = attrs[A.E2E_S]
    assert isinstance(ttft, float) and 0 < ttft < e2e <= (span.end_time - span.start_time) / 1e9
    assert span.status.status_code != StatusCode.ERROR


def test_e2e_ends_at_the_last_chunk_with_choices_not_at_done() -> None:
    """As vLLM's bench serve times E2E (and from it TPOT): the usage chunk and [DONE]
    that follow the last content are not part of it, however late they come."""
    for stack in _stack(StubWorker("prefill"), StubWorker("decode", tail_delay_s=0.3)):
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 3, "stream": True}
        body["stream_options"] = {"include_usage": True}
        assert stack.client.post("/v1/completions", json=body).status_code == 200
        (span,) = stack.request_spans()
        duration = (span.end_time - span.start_time) / 1e9
        assert span.attributes[A.E2E_S] < duration - 0.25


def test_a_one_token_stream_without_usage_has_ttft_and_e2e(stack: Stack) -> None:
    """The router holds the finishing chunk for the usage chunk's fingerprint; when it
    is the only chunk, its write is both the first and the last content."""
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 1, "stream": True}
    resp = stack.client.post("/v1/completions", json=body)
    chunks = [e for e in _events(resp.text) if isinstance(e, dict)]
    assert len(chunks) == 1 and chunks[0]["system_fingerprint"] == FINGERPRINT
    (span,) = stack.request_spans()
    assert span.attributes[A.GEN_AI_SERVER_TTFT] == span.attributes[A.E2E_S] > 0


def test_streaming_chat_relays_usage_when_asked(stack: Stack) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    resp = stack.client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-request-id"].startswith("cmpl-")
    events = _events(resp.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 3
    assert "".join(P.chunk_text(e) for e in events[:-1]) == "yyy"
    (span,) = stack.request_spans()
    assert span.attributes[A.GEN_AI_OPERATION_NAME] == "chat"
    assert span.attributes[A.GEN_AI_USAGE_OUTPUT_TOKENS] == 3


def test_non_streaming_returns_the_decode_json(stack: Stack) -> None:
    resp = stack.client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == "yy"
    (span,) = stack.request_spans()
    assert span.attributes[A.GEN_AI_USAGE_OUTPUT_TOKENS] == 2
    assert span.attributes[A.GEN_AI_USAGE_INPUT_TOKENS] == 3
    assert span.attributes[A.GEN_AI_SERVER_TTFT] > 0
    assert span.attributes[A.STREAM] is False


def test_models_and_health(stack: Stack) -> None:
    assert stack.client.get("/v1/models").json()["data"][0]["id"] == MODEL
    health = stack.client.get("/health").json()
    assert health["status"] == "ok" and health["node_id"] == "router-node"
    assert health["role"] == "router"  # how tokentrace verify knows requests rows exist
    assert [w["healthy"] for w in health["prefill"] + health["decode"]] == [True, True]
    assert health["decode"][0]["outstanding"] == 0


@pytest.mark.parametrize(
    ("content", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({"prompt": "a", "max_tokens": 0}).encode(), 400, "max_tokens"),
        (json.dumps({"max_tokens": 3}).encode(), 400, "prompt"),
        (json.dumps({"model": "nope", "prompt": "a"}).encode(), 404, "nope"),
    ],
)
def test_bad_requests_get_openai_errors(
    stack: Stack, content: bytes, status: int, needle: str
) -> None:
    resp = stack.client.post(
        "/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    assert resp.status_code == status
    error = resp.json()["error"]
    assert error["code"] == status and needle in error["message"]
    assert "type" in error and "param" in error
    assert stack.prefill.seen == []
    (span,) = stack.request_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes[A.HTTP_STATUS] == status


def test_worker_error_status_is_relayed() -> None:
    for stack in _stack(StubWorker("prefill", fail_status=422), StubWorker("decode")):
        resp = stack.client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert resp.status_code == 422
        assert resp.json()["error"]["message"] == "stub says no"
        assert stack.decode.seen == []


def test_unreachable_prefill_worker_is_skipped_and_marked_unhealthy() -> None:
    for stack in _stack(StubWorker("prefill"), StubWorker("decode"), dead_prefill=True):
        for _ in range(3):
            resp = stack.client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
            assert resp.status_code == 200, resp.text
        health = stack.client.get("/health").json()
        assert [w["healthy"] for w in health["prefill"]] == [False, True]


def test_only_worker_unreachable_is_502_naming_it() -> None:
    dead = _free_url()
    decode = Served(StubWorker("decode").app())
    config = RouterConfig(prefill_urls=[dead], decode_urls=[decode.url], port=0)
    router = Served(create_app(config))
    try:
        resp = httpx.post(f"{router.url}/v1/completions", json={"prompt": "a"}, timeout=30)
        assert resp.status_code == 502
        assert dead in resp.json()["error"]["message"]
    finally:
        router.stop()
        decode.stop()


def test_decode_stream_breaking_midway_ends_with_an_error_event() -> None:
    for stack in _stack(StubWorker("prefill"), StubWorker("decode", break_after=2)):
        body = {"prompt": "abc", "max_tokens": 5, "stream": True}
        resp = stack.client.post("/v1/completions", json=body)
        assert resp.status_code == 200
        events = _events(resp.text)
        assert events[-1] == "[DONE]"
        assert "error" in events[-2] and "stream broke" in events[-2]["error"]["message"]
        assert "".join(P.chunk_text(e) for e in events[:-2]) == "yy"
        (span,) = stack.request_spans()
        assert span.status.status_code == StatusCode.ERROR
        health = stack.client.get("/health").json()
        assert health["decode"][0]["healthy"] is False
        assert health["decode"][0]["outstanding"] == 0
        # The router keeps serving: the probe revives the worker after the cool-down.
        assert stack.client.get("/health").status_code == 200


def test_load_generator_through_the_router_sees_every_chunk(stack: Stack) -> None:
    from tokentrace.serving.load import run_load

    result = asyncio.run(run_load(stack.router, 6, 3, 10, 5, progress=False))
    assert result.model == MODEL
    assert result.summary.completed == 6 and result.summary.failed == 0
    span_ids = {s.attributes[A.REQUEST_ID] for s in stack.request_spans()}
    for record in result.records:
        assert record.request_id in span_ids
        assert record.output_tokens == 5 and record.prompt_tokens == 10
        assert len(record.chunk_times_s) == 5 and len(record.itl_s) == 4
        assert record.tpot_s is not None
    # The stub sleeps 2 ms between tokens: a buffering hop would squash the gaps to ~0.
    assert result.summary.itl.mean_ms is not None and result.summary.itl.mean_ms > 0.5
    assert all(len(p["body"]["prompt"]) == 10 for p in stack.prefill.seen)


def test_a_warmed_up_load_measures_only_its_own_requests(stack: Stack) -> None:
    """``warmup``: one unmeasured 2-token request per concurrency slot goes first (each
    with its own id), then the measured ones, on the connections the warm-up opened."""
    from tokentrace.serving.load import run_load

    result = asyncio.run(
        run_load(stack.router, 4, 2, 10, 5, progress=False, request_id_prefix="w", warmup=True)
    )
    assert [r.request_id for r in result.records] == ["w-0", "w-1", "w-2", "w-3"]
    assert result.summary.completed == 4
    sent = [(d["headers"]["x-request-id"], d["body"]["max_tokens"]) for d in stack.decode.seen]
    assert sorted(sent[:2]) == [("w-warmup-0", 2), ("w-warmup-1", 2)]
    assert sorted(sent[2:]) == [(f"w-{i}", 5) for i in range(4)]


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "usage"])
def test_the_router_relays_the_stream_chunk_for_chunk(
    stack: Stack, chat: bool, include_usage: bool
) -> None:
    """What the client gets through the router is what the worker sends for the client's
    own request: no chunk added, split or merged, the usage chunk the router asked for
    not passed on, and the fingerprint where vLLM puts it without one."""
    body: dict[str, Any] = {"max_tokens": 3, "stream": True}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "abc"})
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    resp = stack.client.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    shaper = StreamShaper(
        chat=chat,
        request_id="id-d",
        model=MODEL,
        include_usage=include_usage,
        fingerprint=FINGERPRINT,
        created=0,
    )
    expected: list[Any] = []
    for i in range(3):
        expected += [c for c, _ in shaper.output("y", "length" if i == 2 else None)]
    prompt_tokens = len(P.validate_request(body, chat).prompt_text)
    expected += shaper.end(prompt_tokens, 3)
    got = [{**e, "created": 0} if isinstance(e, dict) else e for e in _events(resp.text)]
    assert [json.dumps(e) for e in got] == [json.dumps(e) for e in expected]
