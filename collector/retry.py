"""The collector's one notion of a failed operation and of when to try it again.

Every sink the collector talks to (ClickHouse, an OTLP forward target) reports a
failure as a :class:`CollectorError` whose ``transient`` says whether trying again
later may succeed, and every retry loop waits :func:`backoff_s`: exponential from an
initial delay, capped, with jitter so that many collectors do not retry in lockstep.
"""

from __future__ import annotations

import random

__all__ = ["CollectorError", "backoff_s", "jittered_backoff_s"]


class CollectorError(Exception):
    """An operation on a sink failed. ``transient``: retrying later may succeed (the
    peer is unreachable, overloaded or timed out); otherwise the same input will fail
    again (bad SQL, a type mismatch, a refused request). ``retry_after_s``: how long
    the peer asked us to wait, when it said."""

    def __init__(
        self, message: str, *, transient: bool, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after_s = retry_after_s


def backoff_s(attempt: int, initial_s: float, max_s: float, jitter: float = 1.0) -> float:
    """Delay before retry ``attempt`` (1 = first retry): ``initial_s * 2**(attempt-1)``
    capped at ``max_s``, scaled by ``jitter`` (a factor in [0.5, 1], random in use) so
    many collectors do not retry in lockstep."""
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt!r}")
    if not 0.5 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0.5, 1], got {jitter!r}")
    base = initial_s * 2.0 ** min(attempt - 1, 62)
    return min(base, max_s) * jitter


def jittered_backoff_s(attempt: int, initial_s: float, max_s: float) -> float:
    """:func:`backoff_s` with a random jitter: what the retry loops wait."""
    return backoff_s(attempt, initial_s, max_s, random.uniform(0.5, 1.0))
