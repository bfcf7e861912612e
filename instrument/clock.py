"""This process's wall clock, and NTP-style offset estimation between two processes.

The frontend (the router) estimates every worker's clock offset from the timestamps of
the HTTP exchanges it already has with it: it sends at ``t0`` (its clock), the worker
receives at ``t1`` and replies at ``t2`` (the worker's clock, returned in the
:data:`CLOCK_HEADER` response header when the request asked for it with the same
header, with the worker's node id), and the frontend receives the reply at ``t3``. Then

    offset = ((t1 - t0) + (t2 - t3)) / 2      (worker clock - frontend clock)
    rtt    = (t3 - t0) - (t2 - t1)

and the offset's error is at most ``rtt / 2`` (the worst asymmetry of the two one-way
delays). :class:`OffsetEstimator` keeps the samples of a sliding time window; its error
bound is never worse than the minimum-round-trip sample's (see there).

``TOKENTRACE_CLOCK_SKEW_MS`` (a test switch) shifts every wall-clock timestamp this
process reports -- its exported span times and the ``t1``/``t2`` it returns -- by that
many milliseconds (it may be negative), exactly as if the machine's clock were off.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import quote, unquote

__all__ = [
    "CLOCK_HEADER",
    "SKEW_ENV",
    "ClockEstimate",
    "ClockReply",
    "OffsetEstimator",
    "format_clock_header",
    "now_ns",
    "parse_clock_header",
    "skew_ns",
]

SKEW_ENV = "TOKENTRACE_CLOCK_SKEW_MS"
# Request header: "1" asks for the exchange; response header:
# "t1=<ns>;t2=<ns>;node=<percent-encoded node id>".
CLOCK_HEADER = "tokentrace-clock"

_skew_ns: int | None = None


def skew_ns() -> int:
    """The injected clock skew in integer nanoseconds (0 unless ``TOKENTRACE_CLOCK_SKEW_MS``
    is set). Read once; a value that is not a finite number raises ``ValueError``."""
    global _skew_ns
    if _skew_ns is None:
        raw = os.environ.get(SKEW_ENV, "").strip()
        try:
            ms = float(raw) if raw else 0.0
        except ValueError:
            raise ValueError(f"{SKEW_ENV} must be a number of milliseconds, got {raw!r}") from None
        if not math.isfinite(ms):
            raise ValueError(f"{SKEW_ENV} must be a finite number of milliseconds, got {raw!r}")
        _skew_ns = round(ms * 1e6)
    return _skew_ns


def now_ns() -> int:
    """This process's wall clock in ns since the epoch, as it reports it (with skew)."""
    return time.time_ns() + skew_ns()


@dataclass(frozen=True)
class ClockReply:
    """The worker's side of one exchange: arrival and reply times on its clock (ns)."""

    t1_ns: int
    t2_ns: int
    node: str = ""


def format_clock_header(t1_ns: int, t2_ns: int, node: str = "") -> str:
    value = f"t1={t1_ns};t2={t2_ns}"
    return f"{value};node={quote(node, safe='')}" if node else value


def parse_clock_header(value: str | None) -> ClockReply | None:
    """The :data:`CLOCK_HEADER` response value, None if absent or malformed."""
    if not value:
        return None
    fields: dict[str, str] = {}
    for part in value.split(";"):
        key, sep, text = part.strip().partition("=")
        if not sep:
            return None
        fields[key] = text
    try:
        t1, t2 = int(fields["t1"]), int(fields["t2"])
    except (KeyError, ValueError):
        return None
    if t2 < t1:
        return None
    return ClockReply(t1, t2, unquote(fields.get("node", "")))


@dataclass(frozen=True)
class ClockEstimate:
    """A peer's clock minus ours, and the bound on its error (seconds)."""

    offset_s: float
    error_s: float
    samples: int


class OffsetEstimator:
    """Offset bounds intersected over the samples of the last ``window_s`` seconds.

    Each exchange bounds the offset, by causality alone: the peer received after we sent
    (``offset <= t1 - t0``) and we received after it replied (``offset >= t2 - t3``), an
    interval as wide as the exchange's round trip. The estimate is the middle of the
    intersection of all the window's intervals and its error half the intersection's
    width: never worse than the minimum-round-trip sample's, usually better, and
    consistent with every exchange in the window -- so an interval between one of those
    sends and its arrival never comes out negative. When a new exchange contradicts the
    older ones (the peer's clock was stepped), the older ones are dropped.

    Not thread-safe: feed and read it from one thread (the router's event loop).
    """

    def __init__(self, window_s: float = 30.0, max_samples: int = 4096) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s!r}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be at least 1, got {max_samples!r}")
        self.window_s = window_s
        self.max_samples = max_samples
        self._seq = 0
        self._samples: deque[tuple[int, float]] = deque()  # (seq, monotonic time added)
        # Sliding-window extremes: the largest lower bound, the smallest upper bound.
        self._lows: deque[tuple[int, int]] = deque()  # (seq, t2 - t3), decreasing
        self._highs: deque[tuple[int, int]] = deque()  # (seq, t1 - t0), increasing

    def add(self, t0: int, t1: int, t2: int, t3: int, at_s: float | None = None) -> bool:
        """Add one exchange (integer ns; t0/t3 ours, t1/t2 the peer's). Returns False and
        ignores it when the timestamps are inconsistent (negative round trip)."""
        if t3 < t0 or t2 < t1 or (t3 - t0) < (t2 - t1):
            return False
        low, high = t2 - t3, t1 - t0
        seq = self._seq = self._seq + 1
        self._samples.append((seq, time.monotonic() if at_s is None else at_s))
        while self._lows and self._lows[-1][1] <= low:
            self._lows.pop()
        self._lows.append((seq, low))
        while self._highs and self._highs[-1][1] >= high:
            self._highs.pop()
        self._highs.append((seq, high))
        # A contradiction means the peer's clock moved: forget what came before.
        while self._lows[0][1] > self._highs[0][1]:
            self._drop_oldest()
        while len(self._samples) > self.max_samples:
            self._drop_oldest()
        return True

    def _drop_oldest(self) -> None:
        seq, _ = self._samples.popleft()
        if self._lows[0][0] == seq:
            self._lows.popleft()
        if self._highs[0][0] == seq:
            self._highs.popleft()

    def estimate(self, at_s: float | None = None) -> ClockEstimate | None:
        """The estimate from the window ending at ``at_s`` (default now)."""
        horizon = (time.monotonic() if at_s is None else at_s) - self.window_s
        while self._samples and self._samples[0][1] < horizon:
            self._drop_oldest()
        if not self._samples:
            return None
        low, high = self._lows[0][1], self._highs[0][1]
        return ClockEstimate((low + high) / 2e9, (high - low) / 2e9, len(self._samples))
