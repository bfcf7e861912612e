"""ASGI middleware for instrumented HTTP servers."""

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
        scope.setdefault("state", {})[ARRIVAL_KEY] = time.monotonic()
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


def arrival_s(scope: dict[str, Any]) -> float:
    """The stamped arrival time of a request, or now if it was not stamped."""
    state = scope.get("state") or {}
    value = state.get(ARRIVAL_KEY)
    return float(value) if value is not None else time.monotonic()


def wall_ns(monotonic_s: float) -> int:
    """A ``time.monotonic()`` reading placed on the wall clock (ns since the epoch), for
    span start times taken before the span could be created."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)
