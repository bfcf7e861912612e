"""How tokentrace's HTTP servers (the router, the workers) serve: uvicorn with each
request's arrival stamped when its bytes are read, after the start-up heap is frozen.
One place, so both measure arrival the same way."""

from __future__ import annotations

import gc
from typing import Any

from tokentrace.instrument import stamping_http_protocol

__all__ = ["freeze_startup_heap", "serve"]


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
    ``uvicorn.run`` (log level, TLS files)."""
    import uvicorn

    freeze_startup_heap()
    uvicorn.run(app, host=host, port=port, http=stamping_http_protocol(), **uvicorn_options)
