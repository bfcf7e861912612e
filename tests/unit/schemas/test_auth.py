"""The shared bearer token: resolution, constant-time matching, the ASGI check."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tokentrace.schemas.auth import (
    AUTH_TOKEN_ENV,
    BearerAuthMiddleware,
    auth_headers,
    resolve_token,
    token_matches,
)


def test_token_comes_from_the_argument_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(AUTH_TOKEN_ENV, raising=False)
    assert resolve_token() is None and auth_headers() == {}
    monkeypatch.setenv(AUTH_TOKEN_ENV, "from-env")
    assert resolve_token() == "from-env" and resolve_token("arg") == "arg"
    assert auth_headers() == {"authorization": "Bearer from-env"}
    monkeypatch.setenv(AUTH_TOKEN_ENV, "")
    assert resolve_token() is None


def test_token_matches_only_the_exact_bearer_value() -> None:
    assert token_matches("s3cret", "Bearer s3cret")
    assert token_matches("s3cret", b"Bearer s3cret")
    for bad in (None, "", "s3cret", "Bearer s3cre", "Bearer s3cret ", "bearer s3cret", "Basic x"):
        assert not token_matches("s3cret", bad), bad


def test_middleware_refuses_without_the_token_but_keeps_health_open() -> None:
    async def app(scope: dict, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    async def call(path: str, headers: dict[str, str]) -> httpx.Response:
        transport = httpx.ASGITransport(app=BearerAuthMiddleware(app, "s3cret"))
        async with httpx.AsyncClient(transport=transport, base_url="http://c") as client:
            return await client.get(path, headers=headers)

    refused = asyncio.run(call("/query", {}))
    assert refused.status_code == 401 and "bearer token" in refused.json()["error"]
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert asyncio.run(call("/query", {"authorization": "Bearer nope"})).status_code == 401
    assert asyncio.run(call("/query", {"authorization": "Bearer s3cret"})).text == "ok"
    assert asyncio.run(call("/health", {})).status_code == 200
    with pytest.raises(ValueError, match="empty"):
        BearerAuthMiddleware(app, "")
