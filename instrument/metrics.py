"""Prometheus metrics of a serving process (``GET /metrics`` on routers and workers).

Who observes what, so that summing a metric over every process never counts a request,
a token gap or a transfer twice:

- the **router** sees each request end to end: ``gen_ai_server_time_to_first_token_seconds``,
  ``gen_ai_server_time_per_output_token_seconds``, ``gen_ai_server_request_duration_seconds``
  and ``tokentrace_requests_total{status}``, with the same definitions (and the same
  ``ok``/``error`` status) as the ``requests`` table;
- the **decode worker** (the one that generates the tokens) observes
  ``tokentrace_inter_token_latency_seconds``: one observation per emission after the
  request's first, the same gaps as ``token_latencies.itl_s``;
- the **worker that reads the KV** (decode, in pull mode) observes
  ``tokentrace_kv_transfer_duration_seconds`` and ``tokentrace_kv_transfer_bytes``
  per transfer, like the ``kv_transfers`` table;
- every worker exports ``tokentrace_queue_depth`` (requests waiting for a decode slot)
  and ``tokentrace_running_batch_size`` (requests in the running batch), read from the
  engine when scraped.

Every metric is labelled ``node``, ``role`` and ``model``. Nothing here runs on the
engine's hot path: histograms are observed once per request, when it ends, from
values the request path computed anyway (the token recorder's emission times, the
router's arrival and first-content times); gauges are read at scrape time.

Each :class:`ServingMetrics` owns a :class:`~prometheus_client.CollectorRegistry`
unless given one, so several apps in one process (tests) keep separate numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from tokentrace.instrument.recorder import TokenRecorder

__all__ = [
    "CONTENT_TYPE",
    "ITL_BUCKETS_S",
    "KV_TRANSFER_BYTES_BUCKETS",
    "KV_TRANSFER_BUCKETS_S",
    "LABELS",
    "REQUEST_DURATION_BUCKETS_S",
    "TPOT_BUCKETS_S",
    "TTFT_BUCKETS_S",
    "ServingMetrics",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST
LABELS = ("node", "role", "model")

# The OpenTelemetry GenAI semantic conventions' recommended explicit bucket boundaries
# (gen_ai.server.time_to_first_token, .time_per_output_token, .request.duration), so
# these histograms line up with any other GenAI server's.
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_DURATION_BUCKETS_S = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
# No convention for ITL: the TPOT boundaries with a sub-10 ms head, since one decode
# step of a batched GPU engine (or the small CPU reference engine) often takes less.
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, *TPOT_BUCKETS_S)
# A transfer moves one request's prompt KV: from a block or two (small models, short
# prompts) to gigabytes (long contexts of large models).
KV_TRANSFER_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
KV_TRANSFER_BYTES_BUCKETS = tuple(float(4**k) for k in range(6, 17))  # 4 KiB .. 4 GiB


class ServingMetrics:
    """The metrics of one serving process, labelled with its ``node`` and ``role``.

    Threading: every method may be called from any thread (prometheus_client locks
    each child); observing costs a few microseconds, so callers do it once per request,
    never per token on the engine thread.
    """

    def __init__(self, node: str, role: str, registry: CollectorRegistry | None = None) -> None:
        if not node:
            raise ValueError("node must not be empty")
        if not role:
            raise ValueError("role must not be empty")
        self.node = node
        self.role = role
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Request arrival to its first content chunk sent to the client (router).",
            LABELS,
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "(e2e - TTFT) / (output tokens - 1), for successful requests of more than one "
            "output token (router).",
            LABELS,
            buckets=TPOT_BUCKETS_S,
            registry=r,
        )
        self.request_duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Request arrival to its last byte sent, every request (router).",
            LABELS,
            buckets=REQUEST_DURATION_BUCKETS_S,
            registry=r,
        )
        self.requests = Counter(
            "tokentrace_requests",
            "Requests answered, by status: ok, or error (router).",
            (*LABELS, "status"),
            registry=r,
        )
        self.itl = Histogram(
            "tokentrace_inter_token_latency_seconds",
            "Gap between consecutive token emissions of one request on its decode node "
            "(the first emission has none).",
            LABELS,
            buckets=ITL_BUCKETS_S,
            registry=r,
        )
        self.kv_duration = Histogram(
            "tokentrace_kv_transfer_duration_seconds",
            "KV transfer post to completion, on the node that reads the KV, by status.",
            (*LABELS, "status"),
            buckets=KV_TRANSFER_BUCKETS_S,
            registry=r,
        )
        self.kv_bytes = Histogram(
            "tokentrace_kv_transfer_bytes",
            "Bytes moved per KV transfer (0 for a failed one), by status.",
            (*LABELS, "status"),
            buckets=KV_TRANSFER_BYTES_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "tokentrace_queue_depth",
            "Requests waiting for a slot in the engine's running batch.",
            LABELS,
            registry=r,
        )
        self.batch_size = Gauge(
            "tokentrace_running_batch_size",
            "Requests in the engine's running batch.",
            LABELS,
            registry=r,
        )

    def _labels(self, model: str) -> tuple[str, str, str]:
        return (self.node, self.role, model)

    def observe_request(
        self,
        model: str,
        ok: bool,
        e2e_s: float,
        ttft_s: float | None,
        output_tokens: int | None,
    ) -> None:
        """One request the router answered. ``ttft_s`` is None when no content was
        sent (an error); TPOT is observed only as the ``requests`` table defines it."""
        labels = self._labels(model)
        self.requests.labels(*labels, "ok" if ok else "error").inc()
        self.request_duration.labels(*labels).observe(e2e_s)
        if ttft_s is None:
            return
        self.ttft.labels(*labels).observe(ttft_s)
        if output_tokens is not None and output_tokens > 1:
            self.tpot.labels(*labels).observe((e2e_s - ttft_s) / (output_tokens - 1))

    def observe_gaps(self, model: str, gaps_s: Iterable[float]) -> int:
        """The inter-token gaps of one finished request; returns how many."""
        child = self.itl.labels(*self._labels(model))
        n = 0
        for gap in gaps_s:
            child.observe(gap)
            n += 1
        return n

    def observe_emissions(self, model: str, recorder: TokenRecorder) -> int:
        """The gaps between the emissions ``recorder`` holds (call once the request
        ended, never on the engine thread); returns how many were observed."""
        return self.observe_gaps(model, recorder.gaps_s())

    def observe_kv_transfer(self, model: str, ok: bool, duration_s: float, nbytes: int) -> None:
        """One KV transfer this node read (or failed to read)."""
        labels = (*self._labels(model), "ok" if ok else "error")
        self.kv_duration.labels(*labels).observe(duration_s)
        self.kv_bytes.labels(*labels).observe(nbytes)

    def track_engine(
        self, model: str, waiting: Callable[[], float], running: Callable[[], float]
    ) -> None:
        """Read the queue depth and running batch size from the engine at scrape time."""
        self.queue_depth.labels(*self._labels(model)).set_function(waiting)
        self.batch_size.labels(*self._labels(model)).set_function(running)

    def render(self) -> bytes:
        """The registry in the Prometheus text format (served with :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)
