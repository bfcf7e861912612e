"""W3C trace context across hops: HTTP headers and vLLM's ``kv_transfer_params``."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_propagator = TraceContextTextMapPropagator()


def inject(carrier: MutableMapping[str, Any], context: Context | None = None) -> None:
    """Write ``traceparent`` (and ``tracestate``) of ``context`` (default: current) into
    ``carrier``: a header dict or a ``kv_transfer_params`` dict. No-op without a span."""
    _propagator.inject(carrier, context=context)


def extract(carrier: Mapping[str, Any] | None) -> Context:
    """The remote parent context found in ``carrier`` (headers or kv_transfer_params);
    an empty context when there is none or it is malformed."""
    if not carrier:
        return Context()
    # Header lookups must be case-insensitive; kv_transfer_params values may be non-str.
    lowered = {str(k).lower(): v for k, v in carrier.items() if isinstance(v, str)}
    return _propagator.extract(lowered)
