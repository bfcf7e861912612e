"""Request validation, SSE parsing, chunk text and the router's pure request rewriting."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tokentrace.serving import openai_protocol as P
from tokentrace.serving.router import (
    PREFILL_KV_TRANSFER_PARAMS,
    RouterConfig,
    Worker,
    WorkerPool,
    decode_request_body,
    new_request_id,
    prefill_request_body,
)

# -- validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "chat", "param", "needle"),
    [
        ({"model": "m"}, False, "prompt", "'prompt' is required"),
        ({"prompt": 5}, False, "prompt", "'prompt' must be a string"),
        ({"prompt": ""}, False, "prompt", "must not be empty"),
        ({"prompt": "hi", "max_tokens": 0}, False, "max_tokens", "positive integer"),
        ({"prompt": "hi", "max_tokens": -3}, False, "max_tokens", "positive integer"),
        ({"prompt": "hi", "max_tokens": "8"}, False, "max_tokens", "positive integer"),
        ({"prompt": "hi", "max_tokens": 2.5}, False, "max_tokens", "positive integer"),
        ({"prompt": "hi", "max_tokens": True}, False, "max_tokens", "positive integer"),
        ({"prompt": "hi", "stream": "yes"}, False, "stream", "'stream' must be a boolean"),
        (
            {"prompt": "hi", "stream_options": {"include_usage": True}},
            False,
            "stream_options",
            "only be given when 'stream' is true",
        ),
        ({"prompt": "hi", "model": 3}, False, "model", "'model' must be"),
        ({"prompt": "hi", "n": 2}, False, "n", "'n'"),
        ({"prompt": "hi", "temperature": -1}, False, "temperature", "'temperature'"),
        ({"prompt": "hi", "seed": "x"}, False, "seed", "'seed'"),
        ({"prompt": "hi", "kv_transfer_params": []}, False, "kv_transfer_params", "object"),
        ({"model": "m"}, True, "messages", "'messages' is required"),
        ({"messages": []}, True, "messages", "non-empty list"),
        ({"messages": ["hi"]}, True, "messages", "messages[0] must be an object"),
        ({"messages": [{"content": "hi"}]}, True, "messages", "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            True,
            "messages",
            "only text parts",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
            True,
            "max_completion_tokens",
            "positive integer",
        ),
    ],
)
def test_invalid_requests_are_400_naming_the_field(
    body: dict[str, Any], chat: bool, param: str, needle: str
) -> None:
    with pytest.raises(P.ProtocolError) as info:
        P.validate_request(body, chat=chat)
    err = info.value
    assert err.status == 400
    assert err.param == param
    assert needle in err.message
    shape = err.body()["error"]
    assert shape == {"message": err.message, "type": "BadRequestError", "param": param, "code": 400}


def test_non_object_body_is_rejected() -> None:
    with pytest.raises(P.ProtocolError, match="JSON object"):
        P.validate_request(["prompt"], chat=False)


def test_completion_request_defaults_and_fields() -> None:
    parsed = P.validate_request({"prompt": ["hello"]}, chat=False)
    assert parsed == P.ParsedRequest(
        model=None,
        prompt_text="hello",
        max_tokens=P.DEFAULT_MAX_TOKENS,
        stream=False,
        include_usage=False,
        ignore_eos=False,
        temperature=1.0,
        seed=None,
        kv_transfer_params=None,
    )
    parsed = P.validate_request(
        {
            "model": "tiny",
            "prompt": "abc",
            "max_tokens": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            "temperature": 0,
            "seed": 3,
            "kv_transfer_params": {"remote_host": "h"},
        },
        chat=False,
    )
    assert (parsed.model, parsed.max_tokens, parsed.stream, parsed.include_usage) == (
        "tiny",
        7,
        True,
        True,
    )
    assert (parsed.ignore_eos, parsed.temperature, parsed.seed) == (True, 0.0, 3)
    assert parsed.kv_transfer_params == {"remote_host": "h"}


def test_chat_request_renders_the_prompt_deterministically() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
            },
        ],
        "max_tokens": 3,
        "max_completion_tokens": 5,
    }
    parsed = P.validate_request(body, chat=True)
    assert parsed.prompt_text == "system: be brief\nuser: hi there\nassistant: "
    assert parsed.max_tokens == 5  # max_completion_tokens wins, as in OpenAI's API
    assert P.render_chat_prompt([{"role": "user", "content": "x"}]) == "user: x\nassistant: "


# -- SSE and chunks ------------------------------------------------------------------


def test_parse_sse_data() -> None:
    assert P.parse_sse_data('data: {"a": 1}') == {"a": 1}
    assert P.parse_sse_data(b'data:{"a":1}\n') == {"a": 1}
    assert P.parse_sse_data("data: [DONE]") == "[DONE]"
    assert P.parse_sse_data("") is None
    assert P.parse_sse_data(": keep-alive") is None
    assert P.parse_sse_data("event: message") is None
    with pytest.raises(ValueError, match="not JSON"):
        P.parse_sse_data("data: {oops")
    with pytest.raises(ValueError, match="not a JSON object"):
        P.parse_sse_data("data: [1, 2]")


def test_sse_event_round_trips() -> None:
    chunk = P.completion_chunk("cmpl-1", "m", "x", created=1)
    raw = P.sse_event(chunk)
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    assert P.parse_sse_data(raw.decode().strip()) == chunk
    assert P.sse_event(P.DONE) == b"data: [DONE]\n\n"


def test_chunk_text_for_completions_and_chat() -> None:
    assert P.chunk_text(P.completion_chunk("cmpl-1", "m", "tok")) == "tok"
    assert P.chunk_text(P.chat_chunk("chatcmpl-1", "m", content="tok")) == "tok"
    assert P.chunk_text(P.chat_role_chunk("chatcmpl-1", "m")) == ""
    assert P.chunk_text(P.chat_chunk("chatcmpl-1", "m", "", finish_reason="length")) == ""
    assert P.chunk_text(P.usage_chunk("cmpl-1", "m", 3, 4, chat=False)) == ""
    assert P.chunk_text(P.chat_response("chatcmpl-1", "m", "all", "stop", 1, 1)) == "all"
    assert P.chunk_text({"choices": [{"index": 0, "delta": {"content": None}}]}) == ""
    assert P.chunk_text({}) == ""


def test_response_shapes() -> None:
    """The shapes themselves are checked against vLLM's in test_stream_shape.py; this is
    what the router reads from them."""
    r = P.completion_response("cmpl-1", "m", "out", "length", 3, 2, created=5)
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == "out"
    assert r["usage"]["completion_tokens"] == 2 and r["usage"]["total_tokens"] == 5
    c = P.chat_response("chatcmpl-1", "m", "out", "stop", 3, 2)
    assert c["object"] == "chat.completion"
    assert c["choices"][0]["message"]["content"] == "out"
    chunk = P.chat_chunk("chatcmpl-1", "m", content="o")
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"][0]["delta"] == {"content": "o"}
    assert P.chunk_finish_reasons(r) == ["length"]
    assert P.chunk_finish_reasons(chunk) == []
    u = P.usage_chunk("chatcmpl-1", "m", 3, 2, chat=True)
    assert u["choices"] == [] and u["usage"]["total_tokens"] == 5
    assert P.completion_id().startswith("cmpl-") and P.chat_completion_id().startswith("chatcmpl-")
    json.dumps([r, c, chunk, u])  # all JSON-serialisable


# -- router request rewriting --------------------------------------------------------


def test_prefill_body_asks_for_one_token_and_a_remote_decode() -> None:
    body = {
        "model": "m",
        "prompt": "abc",
        "max_tokens": 50,
        "max_completion_tokens": 50,
        "stream": True,
        "stream_options": {"include_usage": True},
        "min_tokens": 10,
        "temperature": 0.5,
    }
    original = json.loads(json.dumps(body))
    out = prefill_request_body(body)
    assert body == original  # the client's body is not mutated
    assert out["max_tokens"] == 1
    assert out["max_completion_tokens"] == 1
    assert out["stream"] is False
    assert "stream_options" not in out and "min_tokens" not in out
    assert out["kv_transfer_params"] == {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    assert out["kv_transfer_params"] is not PREFILL_KV_TRANSFER_PARAMS
    assert (out["model"], out["prompt"], out["temperature"]) == ("m", "abc", 0.5)


def test_prefill_body_replaces_client_kv_params() -> None:
    out = prefill_request_body({"prompt": "a", "kv_transfer_params": {"do_remote_prefill": True}})
    assert out["kv_transfer_params"]["do_remote_decode"] is True
    assert "max_completion_tokens" not in out


def test_decode_body_passes_kv_params_unchanged_and_asks_for_usage() -> None:
    kv = {"remote_engine_id": "e", "remote_block_ids": [1, 2], "opaque": {"x": [None]}}
    body = {"prompt": "abc", "max_tokens": 5, "stream": True}
    out = decode_request_body(body, kv, stream=True)
    assert out["kv_transfer_params"] == kv
    assert out["stream_options"] == {"include_usage": True}
    assert out["max_tokens"] == 5 and out["stream"] is True
    assert "kv_transfer_params" not in body

    body2 = {"prompt": "a", "stream": True, "stream_options": {"continuous_usage_stats": True}}
    out2 = decode_request_body(body2, None, stream=True)
    assert out2["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    assert body2["stream_options"] == {"continuous_usage_stats": True}

    out3 = decode_request_body({"prompt": "a"}, kv, stream=False)
    assert "stream_options" not in out3 and out3["kv_transfer_params"] == kv


def test_request_ids() -> None:
    a, b = new_request_id(), new_request_id()
    assert a.startswith("cmpl-") and len(a) == len("cmpl-") + 32 and a != b


# -- config and worker choice --------------------------------------------------------


def test_router_config_validation() -> None:
    cfg = RouterConfig(prefill_urls=["http://a:1/"], decode_urls="http://b:2").validate()
    assert cfg.prefill_urls == ("http://a:1",) and cfg.decode_urls == ("http://b:2",)
    with pytest.raises(ValueError, match="prefill_urls"):
        RouterConfig(prefill_urls=[], decode_urls=["http://b:2"]).validate()
    with pytest.raises(ValueError, match="'b:2'"):
        RouterConfig(prefill_urls=["http://a:1"], decode_urls=["b:2"]).validate()
    with pytest.raises(ValueError, match="port"):
        RouterConfig(["http://a:1"], ["http://b:2"], port=70000).validate()
    with pytest.raises(ValueError, match="request_timeout_s"):
        RouterConfig(["http://a:1"], ["http://b:2"], request_timeout_s=0).validate()
    aggregated = RouterConfig(worker_urls=["http://w:1/", "http://w:2"]).validate()
    assert aggregated.worker_urls == ("http://w:1", "http://w:2")
    with pytest.raises(ValueError, match="cannot be combined"):
        RouterConfig(["http://a:1"], ["http://b:2"], worker_urls=["http://w:1"]).validate()
    with pytest.raises(ValueError, match="worker_urls: worker URL must start"):
        RouterConfig(worker_urls=["w:1"]).validate()
    with pytest.raises(ValueError, match="prefill_urls must name at least one"):
        RouterConfig().validate()


def test_pool_picks_least_outstanding_with_round_robin_ties() -> None:
    pool = WorkerPool("decode", [Worker(f"http://w{i}", "decode") for i in range(3)])
    picks = [pool.pick(set()) for _ in range(6)]
    assert [w.url for w in picks if w] == ["http://w0", "http://w1", "http://w2"] * 2
    pool.workers[0].outstanding = 2
    pool.workers[1].outstanding = 1
    pool.workers[2].outstanding = 1
    assert [pool.pick(set()).url for _ in range(2)] == ["http://w1", "http://w2"]  # type: ignore[union-attr]


def test_pool_skips_unhealthy_and_excluded_workers() -> None:
    pool = WorkerPool("prefill", [Worker(f"http://w{i}", "prefill") for i in range(2)])
    pool.workers[0].healthy = False
    assert {pool.pick(set()).url for _ in range(3)} == {"http://w1"}  # type: ignore[union-attr]
    # With every healthy worker excluded, an unhealthy one is still tried...
    assert pool.pick({"http://w1"}).url == "http://w0"  # type: ignore[union-attr]
    # ...and with all excluded there is none.
    assert pool.pick({"http://w0", "http://w1"}) is None


def test_sse_lines_split_where_sse_does_not_where_splitlines_does() -> None:
    """A chunk's text may hold U+0085 or U+2028 unescaped (vLLM writes JSON that way);
    only LF, CRLF and CR end an SSE line, however the bytes arrive."""
    import asyncio

    event = P.sse_event(P.completion_chunk("c", "m", "a\x85b\u2028c"))
    stream = event + b"data: [DONE]\r\n\r\n"
    pieces = [stream[i : i + 3] for i in range(0, len(stream), 3)]

    async def gather() -> list[str]:
        async def chunks() -> Any:
            for piece in pieces:
                yield piece

        return [line async for line in P.sse_lines(chunks())]

    for lines in (asyncio.run(gather()), list(P.iter_sse_lines(pieces))):
        events = [P.parse_sse_data(line) for line in lines]
        assert [e for e in events if e is not None] == [P.parse_sse_data(event), P.DONE]
