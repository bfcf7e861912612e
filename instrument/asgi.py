"""ASGI middleware for instrumented HTTP servers, and the uvicorn protocol that stamps a
request's arrival when its bytes are read."""

from __future__ import annotations

import time
from typing import Any

from tokentrace.instrument.clock import CLOCK_HEADER, format_clock_header, now_ns
from tokentrace.instrument.tracing import resolve_node_id

ARRIVAL_KEY = "tokentrace.arrival_s"
_CLOCK_HEADER_BYTES = CLOCK_HEADER.encode()


class ArrivalStampMiddleware:
    """Stamps each HTTP request's arrival (``time.monotonic()``) into
    ``scope["state"]`` before routing, body parsing and validation, so latencies
    measured from "request arrival" start when the server first saw the request.
    Read it back with :func:`arrival_s`.

    It also answers the clock exchange (:mod:`tokentrace.instrument.clock`): a request
    carrying the ``tokentrace-clock`` header gets one back with this process's wall-clock
    times of arrival (``t1``) and of the response start (``t2``), and its node id
    (``node_id``, else ``TOKENTRACE_NODE_ID``, else the host name). Add it to a stock
    vLLM server with ``--middleware tokentrace.instrument.ArrivalStampMiddleware``.
    """

    def __init__(self, app: Any, node_id: str | None = None) -> None:
        self.app = app
        self.node_id = resolve_node_id(node_id)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t1 = now_ns()
        # Kept if the HTTP protocol already stamped it (stamping_http_protocol).
        scope.setdefault("state", {}).setdefault(ARRIVAL_KEY, time.monotonic())
        if not any(name == _CLOCK_HEADER_BYTES for name, _ in scope.get("headers") or ()):
            await self.app(scope, receive, send)
            return

        async def send_with_clock(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                value = format_clock_header(t1, now_ns(), self.node_id).encode()
                headers = [*message.get("headers", ()), (_CLOCK_HEADER_BYTES, value)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_clock)


def stamping_http_protocol() -> type:
    """uvicorn's HTTP protocol (httptools where installed, else h11) that stamps each
    request's arrival (``time.monotonic()``) when the bytes that start it are read, into
    the request's ``scope["state"]``, where :func:`arrival_s` finds it. That is before
    the request is parsed and before its ASGI task gets the event loop, which under load
    is later by whatever else the loop had to do: time a client waited, and a client's
    TTFT includes. Pass it as ``uvicorn.Config(http=...)``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class StampingHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def data_received(self, data: bytes) -> None:
            received = time.monotonic()
            before = getattr(self, "scope", None)
            super().data_received(data)
            scope = getattr(self, "scope", None)
            # A new request began in these bytes (its ASGI task has not run yet).
            if isinstance(scope, dict) and scope is not before:
                scope.setdefault("state", {}).setdefault(ARRIVAL_KEY, received)

    return StampingHTTPProtocol


def arrival_s(scope: dict[str, Any]) -> float:
    """The stamped arrival time of a request, or now if it was not stamped."""
    state = scope.get("state") or {}
    value = state.get(ARRIVAL_KEY)
    return float(value) if value is not None else time.monotonic()


def wall_ns(monotonic_s: float) -> int:
    """A ``time.monotonic()`` reading placed on the wall clock (ns since the epoch), for
    span start times taken before the span could be created."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)
