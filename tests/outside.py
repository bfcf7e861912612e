"""A loopback HTTP server standing for "outside the database" in the SQL guard's tests:
it counts every request and answers with a marker, so a statement that reached it is
seen twice over (a hit, and the marker in a response)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class OutsideServer:
    """``url`` to point statements at; ``hits`` requests so far."""

    def __init__(self, url: str, handler: type[_CountingHandler]) -> None:
        self.url = url
        self._handler = handler

    @property
    def hits(self) -> int:
        return self._handler.hits


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    hits = 0
    marker = b""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        type(self).hits += 1
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.marker + b"\n")

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def outside_server(marker: str) -> Iterator[OutsideServer]:
    """Serve on 127.0.0.1 (a port the OS picks) for the block."""
    handler = type("Handler", (_CountingHandler,), {"hits": 0, "marker": marker.encode()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield OutsideServer(f"http://127.0.0.1:{server.server_address[1]}/outside", handler)
    finally:
        server.shutdown()
        server.server_close()
