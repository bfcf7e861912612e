"""The optional bearer token every tokentrace endpoint shares, and its ASGI check.

When a token is configured (``--auth-token``, else ``TOKENTRACE_AUTH_TOKEN``), the
collector's OTLP receivers, SQL and Jaeger APIs and the router answer a request
without ``Authorization: Bearer <token>`` with 401 (gRPC: ``UNAUTHENTICATED``).
``GET /health`` stays open for liveness probes. The comparison takes the same time
whatever the mismatch. Clients -- the instrumentation's exporter, ``tokentrace
query``, ``tokentrace load`` -- send the token from the same variable.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from collections.abc import Collection
from typing import Any

__all__ = [
    "AUTH_TOKEN_ENV",
    "BearerAuthMiddleware",
    "auth_headers",
    "is_loopback_host",
    "refuse_unauthenticated_exposure",
    "resolve_token",
    "token_matches",
]

AUTH_TOKEN_ENV = "TOKENTRACE_AUTH_TOKEN"


def resolve_token(token: str | None = None) -> str | None:
    """The token to require or send: the argument, else ``TOKENTRACE_AUTH_TOKEN``, else
    None (no authentication)."""
    value = token if token is not None else os.environ.get(AUTH_TOKEN_ENV)
    return value or None


def is_loopback_host(host: str) -> bool:
    """Whether listening on ``host`` is reachable from this machine only: ``localhost``
    or a loopback address (127.0.0.0/8, ::1). Any other name, ``0.0.0.0`` and ``::``
    count as reachable from the network (names are not resolved: fail closed)."""
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def refuse_unauthenticated_exposure(
    addresses: dict[str, str], token: str | None, allow_unauthenticated: bool
) -> None:
    """Raise ValueError unless every listener is on loopback, or a token is set, or
    unauthenticated listening was asked for by name. ``addresses``: what → host."""
    if token or allow_unauthenticated:
        return
    exposed = [
        f"{what} on {host or '*'}" for what, host in addresses.items() if not is_loopback_host(host)
    ]
    if exposed:
        raise ValueError(
            "refusing to listen beyond this machine without authentication "
            f"({', '.join(exposed)}): anyone who reaches it could read every stored trace "
            "and send spans. Set "
            f"--auth-token TOKEN (or {AUTH_TOKEN_ENV}), listen on 127.0.0.1, or pass "
            "--allow-unauthenticated to accept that"
        )


def auth_headers(token: str | None = None) -> dict[str, str]:
    """``{"authorization": "Bearer <token>"}`` for a client, or ``{}`` without a token."""
    value = resolve_token(token)
    return {"authorization": f"Bearer {value}"} if value else {}


def token_matches(token: str, authorization: str | bytes | None) -> bool:
    """Whether an ``Authorization`` header value carries ``token``, in constant time."""
    expected = f"Bearer {token}".encode()
    if authorization is None:
        got = b""
    elif isinstance(authorization, str):
        got = authorization.encode("utf-8", "surrogateescape")
    else:
        got = authorization
    return hmac.compare_digest(expected, got)


class BearerAuthMiddleware:
    """Refuses HTTP requests without the bearer token (401, ``WWW-Authenticate:
    Bearer``), except to ``open_paths``."""

    def __init__(self, app: Any, token: str, open_paths: Collection[str] = ("/health",)) -> None:
        if not token:
            raise ValueError("the auth token must not be empty")
        self.app = app
        self.token = token
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = next(
            (value for name, value in scope.get("headers") or () if name == b"authorization"),
            None,
        )
        if token_matches(self.token, header):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {"error": "missing or wrong bearer token (Authorization: Bearer <token>)"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="tokentrace"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
