"""How tokentrace's HTTP servers (the router, the workers) serve: uvicorn with each
request's arrival stamped when its bytes are read, after the start-up heap is frozen.
One place, so both measure arrival the same way."""

from __future__ import annotations

import gc
from typing import Any

from tokentrace.instrument import stamping_http_protocol

__all__ = ["CLIENT_KEEPALIVE_S", "SERVER_KEEPALIVE_S", "freeze_startup_heap", "serve"]

# How long an idle keep-alive connection lives. A client that reuses a connection the
# server is closing at that moment gets a dropped request (httpx: ReadError), so a
# client's idle limit must be below the server's: our servers keep idle connections 75 s
# (above aiohttp's 15 s and httpx's 5 s client defaults, which load generators use), and
# our clients (the router, the workers) drop theirs after 3 s, below uvicorn's and
# stock vLLM's 5 s server default, since they may talk to either.
SERVER_KEEPALIVE_S = 75
CLIENT_KEEPALIVE_S = 3.0


def freeze_startup_heap() -> None:
    """Move everything alive after start-up (imports, the app, the model) out of the
    garbage collector's reach, as vLLM's engine does after its init: otherwise every
    full collection walks those objects again, a pause of milliseconds on the event
    loop that a client sees in its TTFT and gaps and the stamps taken after it do not.
    Call once, just before serving."""
    gc.collect()
    gc.freeze()


def serve(app: Any, host: str, port: int, **uvicorn_options: Any) -> None:
    """Serve ``app`` with uvicorn until interrupted (blocks): the start-up heap frozen,
    requests' arrival stamped when their bytes are read (see
    :func:`tokentrace.instrument.stamping_http_protocol`). ``uvicorn_options`` go to
    ``uvicorn.run`` (log level, TLS files); idle connections are kept
    :data:`SERVER_KEEPALIVE_S` unless they say otherwise."""
    import uvicorn

    freeze_startup_heap()
    uvicorn_options.setdefault("timeout_keep_alive", SERVER_KEEPALIVE_S)
    uvicorn.run(app, host=host, port=port, http=stamping_http_protocol(), **uvicorn_options)
