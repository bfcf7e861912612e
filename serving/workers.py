"""The workers a router routes over: each one's health, outstanding requests (its
leases) and clock offset estimate, and the pool that picks the least outstanding one."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from opentelemetry.trace import Span

from tokentrace.instrument.clock import CLOCK_HEADER, OffsetEstimator, parse_clock_header

__all__ = ["Lease", "Worker", "WorkerPool"]

log = logging.getLogger("tokentrace.serving.router")


class Lease:
    """One request counted in a worker's ``outstanding`` (what least-outstanding routing
    reads). :meth:`release` is idempotent, so whoever owns the request at the end --
    the send that failed, the handler, the stream relay -- can release it without
    knowing whether someone else already did."""

    __slots__ = ("worker", "_held")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.worker.outstanding -= 1


@dataclass
class Worker:
    url: str
    role: str
    outstanding: int = 0
    healthy: bool = True
    down_until: float = 0.0  # time.monotonic(); no probe revives it before this
    node_id: str | None = None  # learned from its /health (stock vLLM's names none)
    clock: OffsetEstimator = field(default_factory=OffsetEstimator)  # its clock vs ours

    def lease(self) -> Lease:
        """Count one more request at this worker until the lease is released."""
        self.outstanding += 1
        return Lease(self)

    def mark_down(self, cooldown_s: float, reason: str) -> None:
        if self.healthy:
            log.warning("%s worker %s marked unhealthy: %s", self.role, self.url, reason)
        self.healthy = False
        self.down_until = time.monotonic() + cooldown_s

    def mark_up(self) -> None:
        if not self.healthy:
            log.info("%s worker %s is healthy again", self.role, self.url)
        self.healthy = True

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "url": self.url,
            "healthy": self.healthy,
            "outstanding": self.outstanding,
        }
        estimate = self.clock.estimate()
        if estimate is not None:
            out["clock_offset_s"] = estimate.offset_s
            out["clock_error_s"] = estimate.error_s
        return out

    def observe_clock(self, t0: int, resp: httpx.Response, t3: int) -> None:
        """Add the clock exchange of one call (sent at ``t0``, answered at ``t3``)."""
        peer = parse_clock_header(resp.headers.get(CLOCK_HEADER))
        if peer is not None:
            self.clock.add(t0, peer.t1_ns, peer.t2_ns, t3)
            if self.node_id is None and peer.node:
                self.node_id = peer.node  # a stock server's /health names no node

    def annotate(self, span: Span, offset_attr: str, error_attr: str) -> None:
        """Put this worker's current clock offset estimate on ``span``."""
        estimate = self.clock.estimate()
        if estimate is not None:
            span.set_attribute(offset_attr, estimate.offset_s)
            span.set_attribute(error_attr, estimate.error_s)


@dataclass
class WorkerPool:
    role: str
    workers: list[Worker]
    _next: int = field(default=0)

    def pick(self, exclude: set[str]) -> Worker | None:
        """Least outstanding among healthy workers not in ``exclude``, ties in round-robin
        order; when none is healthy, the same among the unhealthy ones (a connection
        attempt is the quickest probe). None when every worker is excluded."""
        candidates = [w for w in self.workers if w.url not in exclude and w.healthy]
        if not candidates:
            candidates = [w for w in self.workers if w.url not in exclude]
        if not candidates:
            return None
        least = min(w.outstanding for w in candidates)
        eligible = {id(w) for w in candidates if w.outstanding == least}
        n = len(self.workers)
        for step in range(n):
            i = (self._next + step) % n
            worker = self.workers[i]
            if id(worker) in eligible:
                self._next = (i + 1) % n
                return worker
        return None  # unreachable: some candidate has the least count
