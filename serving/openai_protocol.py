"""OpenAI-compatible request validation and response shapes, shared by router and workers.

Pure functions on dicts and bytes: no I/O, no framework imports. Field names and shapes
follow the OpenAI API as vLLM serves it (``cmpl-``/``chatcmpl-`` ids, ``object``,
``created``, ``model``, ``choices[{index, text|delta|message, logprobs, finish_reason}]``,
``usage``; errors as ``{"error": {"message", "type", "param", "code"}}``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DONE",
    "SSE_DONE",
    "ParsedRequest",
    "ProtocolError",
    "chat_chunk",
    "chat_completion_id",
    "chat_role_chunk",
    "chat_response",
    "chunk_finish_reasons",
    "chunk_text",
    "completion_chunk",
    "completion_id",
    "completion_response",
    "error_body",
    "error_type",
    "iter_sse_lines",
    "parse_sse_data",
    "render_chat_prompt",
    "sse_lines",
    "sse_error",
    "sse_event",
    "usage",
    "usage_chunk",
    "validate_request",
]

DONE: Final = "[DONE]"
SSE_DONE: Final = b"data: [DONE]\n\n"

# OpenAI's default for /v1/completions; also used for chat when the client sets no limit
# (the reference engine has no context-length budget to fill).
DEFAULT_MAX_TOKENS: Final = 16

_ERROR_TYPES: Final = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class ProtocolError(Exception):
    """A request the server must reject: permanent, never retried.

    ``status`` is the HTTP status to answer with; ``param`` names the offending field.
    """

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        """The OpenAI-shaped error body for this error."""
        return error_body(self.message, error_type(self.status), self.status, self.param)


def error_type(status: int) -> str:
    """vLLM's error ``type`` name for an HTTP status (``"BadRequestError"`` for 400...)."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "BadRequestError" if 400 <= status < 500 else "InternalServerError"


def error_body(message: str, type_: str, code: int, param: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# -- requests ------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedRequest:
    """The fields of a completions or chat request that tokentrace's servers act on.

    ``model`` is None when the client named none (the server's only model is meant).
    ``prompt_text`` is the completions prompt, or the chat messages rendered with
    :func:`render_chat_prompt`. ``include_usage`` is ``stream_options.include_usage``.
    """

    model: str | None
    prompt_text: str
    max_tokens: int
    stream: bool
    include_usage: bool
    ignore_eos: bool
    temperature: float
    seed: int | None
    kv_transfer_params: dict[str, Any] | None
    stop: tuple[str, ...] = ()  # stop strings: generation ends where one appears
    include_stop_str_in_output: bool = False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _optional_bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ProtocolError(400, f"'{name}' must be a boolean, got {value!r}", name)
    return value


def _completion_prompt(body: Mapping[str, Any]) -> str:
    if "prompt" not in body or body["prompt"] is None:
        raise ProtocolError(400, "'prompt' is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ProtocolError(
            400,
            f"'prompt' must be a string (or a list of one string), got {prompt!r:.80}",
            "prompt",
        )
    if not prompt:
        raise ProtocolError(400, "'prompt' must not be empty", "prompt")
    return prompt


def _message_content(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise ProtocolError(
                    400,
                    f"messages[{index}].content: only text parts are supported",
                    "messages",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise ProtocolError(
                    400,
                    f"messages[{index}].content: a text part needs a string 'text'",
                    "messages",
                )
            parts.append(text)
        return "".join(parts)
    raise ProtocolError(
        400, f"messages[{index}].content must be a string or a list of text parts", "messages"
    )


def _chat_messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise ProtocolError(400, "'messages' is required", "messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError(400, "'messages' must be a non-empty list of messages", "messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ProtocolError(400, f"messages[{i}] must be an object", "messages")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ProtocolError(400, f"messages[{i}].role must be a non-empty string", "messages")
        out.append({"role": role, "content": _message_content(message, i)})
    return out


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ProtocolError(
            400, f"'stop' must be a non-empty string or a list of them, got {stop!r:.80}", "stop"
        )
    return tuple(stop)


def _max_tokens(body: Mapping[str, Any], chat: bool) -> int:
    # Chat clients may use the newer name; it wins when both are given, as in OpenAI's API.
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise ProtocolError(400, f"'{name}' must be a positive integer, got {value!r}", name)
        return int(value)
    return DEFAULT_MAX_TOKENS


def validate_request(body: Any, chat: bool) -> ParsedRequest:
    """Check a decoded JSON request body; raise :class:`ProtocolError` (400) naming the
    first bad field. ``chat`` selects ``/v1/chat/completions`` rules over ``/v1/completions``.
    """
    if not isinstance(body, Mapping):
        raise ProtocolError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ProtocolError(400, f"'model' must be a non-empty string, got {model!r}", "model")
    if chat:
        prompt_text = render_chat_prompt(_chat_messages(body))
    else:
        prompt_text = _completion_prompt(body)
    max_tokens = _max_tokens(body, chat)
    n = body.get("n")
    if n is not None and n != 1:
        raise ProtocolError(400, f"only 'n' = 1 is supported, got {n!r}", "n")
    stream = _optional_bool(body, "stream", False)
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise ProtocolError(
                400, "'stream_options' can only be given when 'stream' is true", "stream_options"
            )
        if not isinstance(stream_options, Mapping):
            raise ProtocolError(400, "'stream_options' must be an object", "stream_options")
        include_usage = _optional_bool(stream_options, "include_usage", False)
    ignore_eos = _optional_bool(body, "ignore_eos", False)
    temperature = body.get("temperature")
    if temperature is None:
        temperature = 1.0
    elif not _is_number(temperature) or temperature < 0:
        raise ProtocolError(
            400, f"'temperature' must be a number >= 0, got {temperature!r}", "temperature"
        )
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ProtocolError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    kv_transfer_params = body.get("kv_transfer_params")
    if kv_transfer_params is not None and not isinstance(kv_transfer_params, dict):
        raise ProtocolError(400, "'kv_transfer_params' must be an object", "kv_transfer_params")
    return ParsedRequest(
        model=model,
        prompt_text=prompt_text,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        ignore_eos=ignore_eos,
        temperature=float(temperature),
        seed=seed,
        kv_transfer_params=kv_transfer_params,
        stop=_stop(body),
        include_stop_str_in_output=_optional_bool(body, "include_stop_str_in_output", False),
    )


def render_chat_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """A deterministic chat template: ``"<role>: <content>\\n"`` per message, then
    ``"assistant: "``. ``content`` must already be a string."""
    lines = [f"{m['role']}: {m.get('content') or ''}\n" for m in messages]
    return "".join(lines) + "assistant: "


# -- responses -----------------------------------------------------------------------


def completion_id() -> str:
    """A new ``cmpl-<uuid4 hex>`` id."""
    return f"cmpl-{uuid.uuid4().hex}"


def chat_completion_id() -> str:
    """A new ``chatcmpl-<uuid4 hex>`` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def _created(created: int | None) -> int:
    return int(time.time()) if created is None else created


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """``{"prompt_tokens", "total_tokens", "completion_tokens"}``, in vLLM's key order."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def _with_fingerprint(chunk: dict[str, Any], fingerprint: str | None) -> dict[str, Any]:
    if fingerprint is not None:
        chunk["system_fingerprint"] = fingerprint
    return chunk


def completion_chunk(
    id_: str,
    model: str,
    text: str,
    finish_reason: str | None = None,
    created: int | None = None,
    index: int = 0,
    stop_reason: str | int | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """One ``text_completion`` stream chunk carrying ``text``, with vLLM's keys (the
    ``null`` ones included). ``fingerprint`` goes on a stream's last message: the finish
    chunk when no usage chunk follows."""
    choice = {
        "index": index,
        "text": text,
        "logprobs": None,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
        "prompt_token_ids": None,
        "token_ids": None,
    }
    chunk = {
        "id": id_,
        "object": "text_completion",
        "created": _created(created),
        "model": model,
        "choices": [choice],
    }
    return _with_fingerprint(chunk, fingerprint)


def chat_role_chunk(
    id_: str, model: str, created: int | None = None, index: int = 0, role: str = "assistant"
) -> dict[str, Any]:
    """The ``chat.completion.chunk`` vLLM sends with a request's first output, before
    that output's own chunk: ``delta`` ``{"role": "assistant", "content": ""}``."""
    return {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": _created(created),
        "model": model,
        "choices": [
            {
                "index": index,
                "delta": {"role": role, "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "prompt_token_ids": None,
        "prompt_text": None,
    }


def chat_chunk(
    id_: str,
    model: str,
    content: str,
    finish_reason: str | None = None,
    created: int | None = None,
    index: int = 0,
    stop_reason: str | int | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` carrying ``content`` (vLLM's keys: ``stop_reason``
    only on the finishing chunk). ``fingerprint`` as for :func:`completion_chunk`."""
    choice: dict[str, Any] = {
        "index": index,
        "delta": {"content": content},
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    choice["token_ids"] = None
    chunk = {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": _created(created),
        "model": model,
        "choices": [choice],
    }
    return _with_fingerprint(chunk, fingerprint)


def usage_chunk(
    id_: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    chat: bool,
    created: int | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """The last chunk before ``[DONE]`` when ``stream_options.include_usage``: empty
    ``choices``, the usage, and the stream's ``system_fingerprint``."""
    chunk: dict[str, Any] = {
        "id": id_,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": _created(created),
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }
    return _with_fingerprint(chunk, fingerprint)


def _response_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        **usage(prompt_tokens, completion_tokens),
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def completion_response(
    id_: str,
    model: str,
    text: str,
    finish_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    created: int | None = None,
    kv_transfer_params: dict[str, Any] | None = None,
    stop_reason: str | int | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """A non-streaming ``text_completion`` response, every key vLLM sends (nulls
    included). ``kv_transfer_params`` is what vLLM returns from a prefill worker."""
    return {
        "id": id_,
        "object": "text_completion",
        "created": _created(created),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "routed_experts": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": fingerprint,
        "usage": _response_usage(prompt_tokens, completion_tokens),
        "kv_transfer_params": kv_transfer_params,
        "ec_transfer_params": None,
        "metrics": None,
    }


def chat_response(
    id_: str,
    model: str,
    content: str,
    finish_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    created: int | None = None,
    kv_transfer_params: dict[str, Any] | None = None,
    stop_reason: str | int | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """A non-streaming ``chat.completion`` response (see :func:`completion_response`)."""
    return {
        "id": id_,
        "object": "chat.completion",
        "created": _created(created),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
                "token_ids": None,
                "routed_experts": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": fingerprint,
        "usage": _response_usage(prompt_tokens, completion_tokens),
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "prompt_text": None,
        "kv_transfer_params": kv_transfer_params,
        "ec_transfer_params": None,
        "metrics": None,
    }


# -- server-sent events --------------------------------------------------------------


def sse_event(obj: Any) -> bytes:
    """``b"data: <compact json>\\n\\n"`` (UTF-8, not escaped, as vLLM writes it); the
    string ``"[DONE]"`` gives the end marker."""
    if obj == DONE:
        return SSE_DONE
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def sse_error(error: Mapping[str, Any]) -> bytes:
    """A mid-stream error event, as vLLM writes one (``json.dumps``' default spacing)."""
    return b"data: " + json.dumps(error).encode() + b"\n\n"


def _split_sse(buffer: bytes) -> tuple[list[bytes], bytes]:
    *lines, rest = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return lines, rest


async def sse_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """The lines of an SSE byte stream, split where the SSE format splits them: at LF,
    CRLF or CR only. (``str.splitlines``, and so httpx's ``aiter_lines``, also splits at
    U+0085, U+2028 and other characters that vLLM, as JSON allows, writes unescaped
    inside a chunk's text.)"""
    buffer = b""
    async for chunk in chunks:
        lines, buffer = _split_sse(buffer + chunk)
        for line in lines:
            yield line.decode("utf-8", "replace")
    if buffer:
        yield buffer.decode("utf-8", "replace")


def iter_sse_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """:func:`sse_lines` for a blocking byte stream (``httpx.Response.iter_bytes()``)."""
    buffer = b""
    for chunk in chunks:
        lines, buffer = _split_sse(buffer + chunk)
        for line in lines:
            yield line.decode("utf-8", "replace")
    if buffer:
        yield buffer.decode("utf-8", "replace")


def parse_sse_data(line: str | bytes) -> dict[str, Any] | Literal["[DONE]"] | None:
    """The payload of one SSE line: a dict, ``"[DONE]"``, or None for anything that is
    not a ``data:`` line (blank separators, comments, ``event:``/``id:`` fields).

    Raises ``ValueError`` when a ``data:`` payload is not a JSON object.
    """
    if isinstance(line, bytes):
        line = line.decode("utf-8")
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[len("data:") :].strip()
    if payload == DONE:
        return DONE
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise ValueError(f"SSE data is not JSON: {payload[:80]!r}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"SSE data is not a JSON object: {payload[:80]!r}")
    return obj


def chunk_text(chunk: Mapping[str, Any]) -> str:
    """The generated text a completions or chat chunk (or full response) carries: the
    concatenation of ``choices[].text`` / ``choices[].delta.content`` /
    ``choices[].message.content``; "" when there is none (role-only or usage chunks)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return ""
    parts: list[str] = []
    for choice in choices:
        if not isinstance(choice, Mapping):
            continue
        text = choice.get("text")
        if text is None:
            holder = choice.get("delta")
            if holder is None:
                holder = choice.get("message")
            if isinstance(holder, Mapping):
                text = holder.get("content")
        if isinstance(text, str):
            parts.append(text)
    return "".join(parts)


def chunk_finish_reasons(chunk: Mapping[str, Any]) -> list[str]:
    """The non-null ``finish_reason`` values of a chunk's (or response's) choices."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return []
    return [
        c["finish_reason"]
        for c in choices
        if isinstance(c, Mapping) and isinstance(c.get("finish_reason"), str)
    ]
