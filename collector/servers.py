"""The HTTP servers of a collector process (and of ``tokentrace ui``)."""

from __future__ import annotations

import asyncio
import socket
import threading
from concurrent.futures import Future
from typing import Any

from tokentrace.runtime.tls import TlsConfig

__all__ = ["AsgiServers", "hostport"]


def hostport(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class AsgiServers:
    """uvicorn servers sharing one asyncio loop on a daemon thread: the collector's
    OTLP/HTTP and API ports, and ``tokentrace ui``'s page. Each one is bound before it
    is served (the bound port is returned, so port 0 works) and Nagle is off."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tokentrace-http", daemon=True
        )
        self._thread.start()
        self._servers: dict[str, tuple[Any, asyncio.Task[None]]] = {}

    def serve(self, name: str, app: Any, host: str, port: int, tls: TlsConfig | None = None) -> int:
        """Bind ``host:port`` and serve ``app`` (HTTPS with ``tls``); returns the bound
        port once listening."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say
        # they are TCP; with it on, every response after a connection's first waited for the
        # client's delayed ACK, 40 ms.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot bind {name} to {hostport(host, port)}: {exc}") from exc
        bound_port = int(sock.getsockname()[1])
        future: Future[None] = asyncio.run_coroutine_threadsafe(
            self._start(name, app, sock, tls), self._loop
        )
        future.result(timeout=30)
        return bound_port

    async def _start(self, name: str, app: Any, sock: socket.socket, tls: TlsConfig | None) -> None:
        import uvicorn

        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            ssl_certfile=tls.cert_file if tls else None,
            ssl_keyfile=tls.key_file if tls else None,
        )
        server = uvicorn.Server(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()  # raises what went wrong
                raise OSError(f"{name} server exited during startup")
            await asyncio.sleep(0.01)
        self._servers[name] = (server, task)

    def stop(self, name: str) -> None:
        """Stop one server after its in-flight requests finish; idempotent."""
        if name not in self._servers or not self._thread.is_alive():
            return

        async def _stop() -> None:
            server, task = self._servers.pop(name)
            server.should_exit = True
            await task

        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(timeout=30)

    def close(self) -> None:
        for name in list(self._servers):
            self.stop(name)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()
