"""What runs inside serving processes: tracer set-up, span conventions, the token
recorder, W3C context propagation and the Prometheus metrics. Never imports the
collector or serving."""

from tokentrace.instrument.asgi import (
    ArrivalStampMiddleware,
    arrival_s,
    stamping_http_protocol,
    wall_ns,
)
from tokentrace.instrument.export import ExporterCounts
from tokentrace.instrument.metrics import ServingMetrics
from tokentrace.instrument.propagation import TRACEPARENT, extract, inject
from tokentrace.instrument.recorder import TokenRecorder
from tokentrace.instrument.tracing import (
    Tracing,
    resolve_endpoint,
    resolve_node_id,
    setup_tracing,
)

__all__ = [
    "ArrivalStampMiddleware",
    "ExporterCounts",
    "arrival_s",
    "TRACEPARENT",
    "ServingMetrics",
    "TokenRecorder",
    "Tracing",
    "extract",
    "inject",
    "resolve_endpoint",
    "resolve_node_id",
    "setup_tracing",
    "stamping_http_protocol",
    "wall_ns",
]
