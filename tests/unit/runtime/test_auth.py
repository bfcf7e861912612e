"""The shared bearer token: resolution, constant-time matching, the ASGI check, and
when listening beyond loopback needs one."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tokentrace.runtime.auth import (
    AUTH_TOKEN_ENV,
    BearerAuthMiddleware,
    auth_headers,
    is_loopback_host,
    refuse_unauthenticated_exposure,
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


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.5", False),
        ("192.0.2.1", False),
        ("collector", False),  # a name is not resolved: it may point anywhere
        ("localhost.example", False),
    ],
)
def test_only_loopback_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_listening_beyond_loopback_needs_a_token_or_saying_so() -> None:
    ports = {"OTLP/gRPC": "127.0.0.1", "the API": "0.0.0.0"}
    with pytest.raises(ValueError, match=r"the API on 0\.0\.0\.0") as refused:
        refuse_unauthenticated_exposure(ports, None, False)
    assert "OTLP/gRPC" not in str(refused.value)
    refuse_unauthenticated_exposure(ports, "s3cret", False)
    refuse_unauthenticated_exposure(ports, None, True)
    refuse_unauthenticated_exposure({"the API": "127.0.0.1"}, None, False)
