"""An idle keep-alive connection to a router or worker outlives the clients' own idle
limit: a client that reuses a connection the server is closing at that moment loses
the request (the router saw that as a 502 from a prefill worker)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import uvicorn

from tokentrace.serving.procs import free_ports
from tokentrace.serving.serve import CLIENT_KEEPALIVE_S, SERVER_KEEPALIVE_S

UVICORN_DEFAULT_S = uvicorn.Config(app="unused:app").timeout_keep_alive  # not loaded

SERVER = """
import sys
from tokentrace.serving.serve import serve

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})

serve(app, "127.0.0.1", int(sys.argv[1]), log_level="warning")
"""


def _get(sock: socket.socket) -> bytes:
    """One request on ``sock``: the whole response, or what came before it closed."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    while not got.endswith(b"\r\n\r\nok"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def test_clients_give_up_idle_connections_before_any_server_closes_them() -> None:
    # below uvicorn's default (stock vLLM's too), so also true against a server we
    # did not start; and below our own servers' limit
    assert CLIENT_KEEPALIVE_S < UVICORN_DEFAULT_S
    assert CLIENT_KEEPALIVE_S < SERVER_KEEPALIVE_S


def test_a_served_connection_stays_open_past_uvicorns_default_idle_limit() -> None:
    (port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        with sock:
            assert _get(sock).startswith(b"HTTP/1.1 200")
            time.sleep(UVICORN_DEFAULT_S + 1)
            assert _get(sock).startswith(b"HTTP/1.1 200")  # not closed (b"")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
