"""Bad input and a worker killed mid-request, against a real stack on loopback.

Each fault gets a clear error naming the problem; the router and the collector keep
serving; nothing stored before the fault is lost.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tokentrace.serving import openai_protocol as P
from tokentrace.serving.load import run_load
from tokentrace.serving.stack import LocalStack


@pytest.fixture(scope="module")
def baseline(stack: LocalStack) -> int:
    """Requests completed before any fault, all stored."""
    result = asyncio.run(run_load(stack.router_url, 6, 3, 64, 8, progress=False))
    assert all(r.success for r in result.records)
    stack.wait_for_rows("SELECT count() FROM tokentrace.requests", 6)
    stack.wait_for_rows("SELECT count() FROM tokentrace.token_latencies", 48)
    return 6


def _post(
    stack: LocalStack, body: object, path: str = "/v1/completions", raw: bytes | None = None
) -> httpx.Response:
    if raw is not None:
        return httpx.post(
            f"{stack.router_url}{path}",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=30,
        )
    return httpx.post(f"{stack.router_url}{path}", json=body, timeout=30)


def _error_message(resp: httpx.Response) -> str:
    body = resp.json()
    assert set(body["error"]) >= {"message", "type", "code"}
    return str(body["error"]["message"])


def _router_still_serves(stack: LocalStack) -> None:
    # ignore_eos: sampled at temperature 1, the 257-token model ends with EOS now and then
    body = {"model": "tt-tiny", "prompt": "still there?", "max_tokens": 4, "ignore_eos": True}
    resp = _post(stack, body)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["choices"][0]["text"]) == 4


def test_malformed_json_is_rejected(stack: LocalStack, baseline: int) -> None:
    resp = _post(stack, None, raw=b'{"model": "tt-tiny", "prompt": ')
    assert resp.status_code == 400
    assert "json" in _error_message(resp).lower()
    _router_still_serves(stack)


def test_unknown_model_is_404(stack: LocalStack, baseline: int) -> None:
    resp = _post(stack, {"model": "gpt-17", "prompt": "hi", "max_tokens": 4})
    assert resp.status_code == 404
    assert "gpt-17" in _error_message(resp)
    resp = _post(
        stack,
        {"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]},
        path="/v1/chat/completions",
    )
    assert resp.status_code == 404
    _router_still_serves(stack)


def test_oversized_prompt_is_400(stack: LocalStack, baseline: int) -> None:
    resp = _post(stack, {"model": "tt-tiny", "prompt": "a" * 10_000, "max_tokens": 4})
    assert resp.status_code == 400
    msg = _error_message(resp)
    assert "context length" in msg and "10000" in msg
    _router_still_serves(stack)


@pytest.mark.parametrize("max_tokens", [0, -3, "many"])
def test_bad_max_tokens_is_400(stack: LocalStack, baseline: int, max_tokens: object) -> None:
    resp = _post(stack, {"model": "tt-tiny", "prompt": "hi", "max_tokens": max_tokens})
    assert resp.status_code == 400
    assert "max_tokens" in _error_message(resp)


def test_malformed_otlp_is_rejected_and_collector_keeps_everything(
    stack: LocalStack, baseline: int
) -> None:
    otlp = f"http://{stack.otlp_http}/v1/traces"
    bad = [
        ({"content-type": "application/x-protobuf"}, b"\x0a\xff\xff\xff\x0f\x01", 400),
        ({"content-type": "application/json"}, b'{"resourceSpans": [', 400),
        ({"content-type": "text/plain"}, b"hello", 415),
    ]
    for headers, body, status in bad:
        resp = httpx.post(otlp, content=body, headers=headers, timeout=10)
        assert resp.status_code == status, (headers, resp.text)
        assert resp.text  # a message naming the problem
    assert stack.query("SELECT count() AS n FROM tokentrace.requests")[0]["n"] >= baseline
    _router_still_serves(stack)


def _free_blocks(stack: LocalStack) -> dict[str, int]:
    return {
        node: int(httpx.get(f"{url}/health", timeout=10).json()["free_blocks"])
        for node, url in {**stack.prefill, **stack.decode}.items()
    }


def test_client_disconnect_mid_stream_stops_decoding_and_frees_kv(
    stack: LocalStack, baseline: int
) -> None:
    idle = _free_blocks(stack)
    body = {"model": "tt-tiny", "prompt": "x" * 300, "max_tokens": 400, "stream": True}
    body["ignore_eos"] = True
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{stack.router_url}/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            request_id = resp.headers["x-request-id"]
            chunks = 0
            for line in P.iter_sse_lines(resp.iter_bytes()):
                if line.startswith("data: "):
                    chunks += 1
                if chunks == 5:
                    break  # the client goes away mid-stream
    # The decode worker stops generating and every KV block comes back.
    deadline = time.monotonic() + 15
    while _free_blocks(stack) != idle and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _free_blocks(stack) == idle
    rows = []
    while not rows and time.monotonic() < deadline + 15:
        rows = stack.query(
            "SELECT status, output_tokens FROM tokentrace.requests "
            f"WHERE request_id = '{request_id}'"
        )
        time.sleep(0.2)
    assert rows and rows[0]["status"] == "error", rows  # recorded, as a client disconnect
    sql = (
        "SELECT count() AS n FROM tokentrace.token_latencies t JOIN tokentrace.requests r "
        f"ON t.trace_id = r.trace_id WHERE r.request_id = '{request_id}'"
    )
    emitted = 0
    while emitted == 0 and time.monotonic() < deadline + 30:
        emitted = int(stack.query(sql)[0]["n"])
        time.sleep(0.2)
    assert 5 <= emitted < 400  # its tokens were traced, and it stopped well before 400
    _router_still_serves(stack)


def test_decode_worker_killed_mid_request(stack: LocalStack, baseline: int) -> None:
    before = stack.query("SELECT count() AS n FROM tokentrace.token_latencies")[0]["n"]
    chunks: list[dict[str, object]] = []
    killed: list[str] = []
    with httpx.stream(
        "POST",
        f"{stack.router_url}/v1/completions",
        json={
            "model": "tt-tiny",
            "prompt": "a long answer please",
            "max_tokens": 3000,
            "ignore_eos": True,
            "stream": True,
        },
        timeout=60,
    ) as resp:
        assert resp.status_code == 200
        for line in P.iter_sse_lines(resp.iter_bytes()):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks.append(json.loads(line[6:]))
            if len(chunks) == 5 and not killed:
                health = httpx.get(f"{stack.router_url}/health", timeout=5).json()
                busy = [w["url"] for w in health["decode"] if w["outstanding"] > 0]
                assert len(busy) == 1, health
                node = next(n for n, u in stack.decode.items() if u == busy[0])
                stack.workers[node].kill()
                killed.append(node)
    assert killed
    assert "error" in chunks[-1], chunks[-1]
    assert killed[0] in json.dumps(chunks[-1]) or "decode" in json.dumps(chunks[-1])
    # the router keeps serving on the surviving decode worker
    t0 = time.monotonic()
    for _ in range(3):
        _router_still_serves(stack)
    assert time.monotonic() - t0 < 30
    # nothing stored before the fault is lost
    after = stack.query("SELECT count() AS n FROM tokentrace.token_latencies")[0]["n"]
    assert after >= before
    assert stack.query("SELECT count() AS n FROM tokentrace.requests")[0]["n"] >= baseline
    failed = stack.wait_for_rows(
        "SELECT count() FROM tokentrace.requests WHERE status = 'error'", 1
    )
    assert failed >= 1
