"""ASGI middleware for instrumented HTTP servers."""

from __future__ import annotations

import time
from typing import Any

ARRIVAL_KEY = "tokentrace.arrival_s"


class ArrivalStampMiddleware:
    """Stamps each HTTP request's arrival (``time.monotonic()``) into
    ``scope["state"]`` before routing, body parsing and validation, so latencies
    measured from "request arrival" start when the server first saw the request.
    Read it back with :func:`arrival_s`.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})[ARRIVAL_KEY] = time.monotonic()
        await self.app(scope, receive, send)


def arrival_s(scope: dict[str, Any]) -> float:
    """The stamped arrival time of a request, or now if it was not stamped."""
    state = scope.get("state") or {}
    value = state.get(ARRIVAL_KEY)
    return float(value) if value is not None else time.monotonic()


def wall_ns(monotonic_s: float) -> int:
    """A ``time.monotonic()`` reading placed on the wall clock (ns since the epoch), for
    span start times taken before the span could be created."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)
