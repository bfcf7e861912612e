"""The registry of span and resource attribute names tokentrace writes and reads.

OpenTelemetry GenAI semantic-convention names (``gen_ai.*``) where one exists,
``tokentrace.*`` otherwise. Both the instrumentation (which writes them) and the
collector (which derives rows from them) import the names from here only.
"""

from __future__ import annotations

from collections.abc import Mapping

# -- resource attributes (every process) -------------------------------------------
SERVICE_NAME = "service.name"
HOST_NAME = "host.name"
NODE_ID = "tokentrace.node.id"
ROLE = "tokentrace.role"  # router | prefill | decode | both (prefills and decodes)

ROLES = ("router", "prefill", "decode", "both")

# A span's node is the first of these resource attributes that is set (non-empty). The
# one definition: the collector's rows (node_of) and its SQL over the stored spans
# (node_sql) both come from this order.
NODE_KEYS = (NODE_ID, HOST_NAME, SERVICE_NAME)


def node_of(resource_attrs: Mapping[str, str]) -> str:
    """The node identity of a resource (see :data:`NODE_KEYS`); ``""`` if none is set."""
    for key in NODE_KEYS:
        value = resource_attrs.get(key)
        if value:
            return value
    return ""


def node_sql(resource_attributes: str = "ResourceAttributes") -> str:
    """:func:`node_of` as a ClickHouse expression over a stored span's resource
    attributes map column (the OTel ClickHouse layout keeps every resource attribute,
    ``service.name`` included, in that map)."""
    keys = ", ".join(f"nullIf({resource_attributes}['{key}'], '')" for key in NODE_KEYS)
    return f"coalesce({keys}, '')"


# -- span names --------------------------------------------------------------------
SPAN_REQUEST = "llm.request"  # SERVER, router
SPAN_PREFILL = "llm.prefill"  # SERVER, prefill worker
SPAN_KV_TRANSFER = "llm.kv_transfer"  # CLIENT, initiator of the transfer (decode, pull mode)
SPAN_DECODE = "llm.decode"  # SERVER, decode worker
SPAN_TOKEN = "llm.token"  # INTERNAL, child of llm.decode

# -- llm.request / llm.prefill / llm.decode ----------------------------------------
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"  # "text_completion" | "chat"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_SERVER_TTFT = "gen_ai.server.time_to_first_token"  # seconds, float
REQUEST_ID = "tokentrace.request.id"  # the X-Request-Id the router returned
# Set by the router: seconds from arrival to the response's last content written (a
# stream's last chunk with choices; its usage chunk and [DONE] follow), as vLLM's bench
# serve times E2E. The span itself lasts until the last byte.
E2E_S = "tokentrace.request.e2e_s"
STREAM = "tokentrace.request.stream"  # bool
PREFILL_NODE = "tokentrace.prefill.node"  # set by the router: the worker it chose
DECODE_NODE = "tokentrace.decode.node"  # set by the router: the worker it chose
PREFILL_URL = "tokentrace.prefill.url"  # set by the router: the worker it chose
DECODE_URL = "tokentrace.decode.url"  # set by the router: the worker it chose
# Set by the router, on its clock: when it sent the request to the worker it chose.
PREFILL_SENT_NS = "tokentrace.prefill.sent_unix_nano"
DECODE_SENT_NS = "tokentrace.decode.sent_unix_nano"
# Set by the router: its estimate of the chosen worker's clock minus its own (seconds),
# and the estimate's error bound (half the round trip of the sample it came from).
PREFILL_CLOCK_OFFSET_S = "tokentrace.prefill.clock_offset_s"
PREFILL_CLOCK_ERROR_S = "tokentrace.prefill.clock_error_s"
DECODE_CLOCK_OFFSET_S = "tokentrace.decode.clock_offset_s"
DECODE_CLOCK_ERROR_S = "tokentrace.decode.clock_error_s"
QUEUE_TIME_S = "tokentrace.queue_time_s"  # arrival -> engine starts the request
COMPUTE_TIME_S = "tokentrace.compute_time_s"  # engine compute for the request
HTTP_STATUS = "http.response.status_code"

# -- llm.token ---------------------------------------------------------------------
TOKEN_INDEX = "tokentrace.token.index"  # 0-based index of the emission's first token
TOKEN_COUNT = "tokentrace.token.count"  # tokens carried by this emission (>1 when speculating)
# 0-based position of this emission among its request's emissions: the first (0) has no
# inter-token gap. Not the token index: a chat stream's role chunk is an emission of 0
# tokens, sent with the first output, so the emission after it has token index 0 too.
EMISSION_INDEX = "tokentrace.emission.index"
ENGINE_STEP = "tokentrace.engine.step"  # the engine's step counter at this emission
BATCH_SIZE = "tokentrace.batch.size"  # running requests in that step
# Prompt tokens that same engine step also prefilled (piggy-backed prefill) beyond the
# one token per running request: >0 only on a worker doing both prefill and decode. A
# disaggregated decode's recompute of a request's last prompt token is an ordinary
# batch row and counts 0. Absent when the engine does not report it (vLLM).
STEP_PREFILL_TOKENS = "tokentrace.step.prefill_tokens"
# On llm.decode in packed mode, instead of llm.token spans (schemas/packed.py); the
# collector expands it and never stores or forwards it.
TOKEN_PACKED = "tokentrace.token.packed"

# -- llm.kv_transfer ---------------------------------------------------------------
KV_BYTES = "tokentrace.kv.bytes"
KV_BLOCKS = "tokentrace.kv.blocks"
KV_BACKEND = "tokentrace.kv.backend"  # e.g. "nixl/UCX"
KV_SRC_NODE = "tokentrace.kv.src_node"
KV_DST_NODE = "tokentrace.kv.dst_node"
KV_DESCRIPTORS = "tokentrace.kv.descriptors"  # NIXL descriptors after merging

# -- added by the collector's Jaeger API, never sent by a node --------------------
# How far (integer microseconds) this span was moved onto the reference clock.
CLOCK_ADJUSTMENT_US = "tokentrace.clock.adjustment_us"

__all__ = [name for name in dir() if name.isupper()]
