"""The per-request token recorder: the only instrumentation on the engine's hot path.

``record()`` reads the monotonic clock and stores it with the emission's token count,
engine step, batch size and the prompt tokens that step also prefilled into arrays
preallocated when the request starts. Spans are built once, off the hot path, when the
request ends: one ``llm.token`` span per emission (``emit_spans``), or in packed mode
one attribute on the ``llm.decode`` span that the collector expands into the same
spans (``pack_into``, :mod:`tokentrace.schemas.packed`). One wall-clock anchor per
request places the monotonic times on the timeline.
"""

from __future__ import annotations

import time
from array import array

from opentelemetry import trace
from opentelemetry.context import Context

from tokentrace.schemas import attributes as A
from tokentrace.schemas.packed import encode_packed


def _zeros(typecode: str, n: int) -> array:
    return array(typecode, bytes(array(typecode).itemsize * n))


class TokenRecorder:
    """Token emission times of one request on one decode node.

    Threading: ``start``/``record`` are called from one thread (a worker records each
    chunk on its event loop as the chunk goes out; the vLLM plugin, vLLM's); ``emit_spans``
    after the request finished, from any one thread.

    ``step_prefill=False`` is for emitters that cannot tell how many prompt tokens a
    step prefilled (the vLLM plugin): their spans carry no
    ``tokentrace.step.prefill_tokens`` and they pack version 1, so the count is stored
    as unknown (NULL) rather than as 0.
    """

    __slots__ = (
        "_times",
        "_counts",
        "_steps",
        "_batch",
        "_prefill",
        "_step_prefill",
        "_n",
        "_capacity",
        "start_mono_ns",
        "anchor_wall_ns",
        "anchor_mono_ns",
    )

    def __init__(self, capacity: int, *, step_prefill: bool = True) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity!r}")
        self._capacity = capacity
        self._times = _zeros("q", capacity)
        self._counts = _zeros("H", capacity)
        self._steps = _zeros("q", capacity)
        self._batch = _zeros("H", capacity)
        self._prefill = _zeros("I", capacity)
        self._step_prefill = step_prefill
        self._n = 0
        self.anchor_wall_ns = time.time_ns()
        self.anchor_mono_ns = time.monotonic_ns()
        self.start_mono_ns = self.anchor_mono_ns

    def start(self) -> None:
        """Mark decode start: the first token span begins here."""
        self.start_mono_ns = time.monotonic_ns()

    def record(self, tokens: int, step: int, batch_size: int, prefill_tokens: int = 0) -> None:
        """Hot path: one emission of ``tokens`` tokens in engine step ``step``, which ran
        ``batch_size`` requests and also prefilled ``prefill_tokens`` prompt tokens."""
        i = self._n
        if i == self._capacity:
            self._grow()
        self._times[i] = time.monotonic_ns()
        self._counts[i] = tokens
        self._steps[i] = step
        self._batch[i] = batch_size
        self._prefill[i] = prefill_tokens
        self._n = i + 1

    def record_at(self, t_mono_ns: int, tokens: int, step: int, batch_size: int) -> None:
        """Like :meth:`record`, with the emission time (``time.monotonic_ns()`` clock,
        which is the same in every process of the machine) given by the caller."""
        i = self._n
        if i == self._capacity:
            self._grow()
        self._times[i] = t_mono_ns
        self._counts[i] = tokens
        self._steps[i] = step
        self._batch[i] = batch_size
        self._n = i + 1

    def _grow(self) -> None:
        # Off the common path: only when a request emits more often than its capacity.
        n = self._capacity
        for name in ("_times", "_counts", "_steps", "_batch", "_prefill"):
            buf = getattr(self, name)
            buf.extend(_zeros(buf.typecode, n))
        self._capacity = 2 * n

    @property
    def emissions(self) -> int:
        return self._n

    @property
    def tokens(self) -> int:
        return sum(self._counts[: self._n])

    def wall_ns(self, mono_ns: int) -> int:
        """A monotonic reading of this request placed on the wall-clock timeline."""
        return self.anchor_wall_ns + (mono_ns - self.anchor_mono_ns)

    def emission_wall_ns(self, i: int) -> int:
        """Wall-clock time of emission ``i`` (0-based)."""
        if not 0 <= i < self._n:
            raise IndexError(f"emission {i} out of range (have {self._n})")
        return self.wall_ns(self._times[i])

    def first_emission_s(self) -> float | None:
        """Decode start → first emission, in seconds (engine-side TTFT on this node)."""
        if self._n == 0:
            return None
        return (self._times[0] - self.start_mono_ns) / 1e9

    def gaps_s(self) -> list[float]:
        """Seconds between consecutive emissions (none before the first): the
        ``itl_s`` of this request's ``token_latencies`` rows, for the ITL histogram."""
        times = self._times
        return [(times[i] - times[i - 1]) / 1e9 for i in range(1, self._n)]

    def pack(self, span_start_ns: int) -> str:
        """The packed-token attribute value, times relative to ``span_start_ns`` (the
        wall-clock start of the ``llm.decode`` span that will carry it)."""
        n = self._n
        base = self.anchor_wall_ns - self.anchor_mono_ns - span_start_ns
        times = array("q", [self.start_mono_ns + base])
        times.extend([t + base for t in self._times[:n]])
        prefill = self._prefill[:n] if self._step_prefill else None
        return encode_packed(times, self._steps[:n], self._counts[:n], self._batch[:n], prefill)

    def pack_into(self, span: trace.Span) -> int:
        """Packed mode: put every emission on ``span`` (the request's ``llm.decode``,
        not yet ended) as one attribute; returns the count."""
        start = getattr(span, "start_time", None)
        if start is None or not span.is_recording():
            return 0
        span.set_attribute(A.TOKEN_PACKED, self.pack(int(start)))
        return self._n

    def emit(self, tracer: trace.Tracer, decode_span: trace.Span, packed: bool) -> int:
        """The request's token emissions, packed onto ``decode_span`` or as ``llm.token``
        spans under it."""
        if packed:
            return self.pack_into(decode_span)
        return self.emit_spans(tracer, trace.set_span_in_context(decode_span))

    def emit_spans(self, tracer: trace.Tracer, parent: Context) -> int:
        """Build one ``llm.token`` span per emission under ``parent``; returns the count.

        Each span starts at the previous emission (the first at decode start) and ends
        at this one, so its duration is the inter-token gap.
        """
        prev = self.wall_ns(self.start_mono_ns)
        index = 0
        times, counts, steps, batch = self._times, self._counts, self._steps, self._batch
        for i in range(self._n):
            end = self.wall_ns(times[i])
            attributes = {
                A.EMISSION_INDEX: i,
                A.TOKEN_INDEX: index,
                A.TOKEN_COUNT: counts[i],
                A.ENGINE_STEP: steps[i],
                A.BATCH_SIZE: batch[i],
            }
            if self._step_prefill:
                attributes[A.STEP_PREFILL_TOKENS] = self._prefill[i]
            span = tracer.start_span(
                A.SPAN_TOKEN,
                context=parent,
                kind=trace.SpanKind.INTERNAL,
                start_time=prev,
                attributes=attributes,
            )
            span.end(end_time=end)
            prev = end
            index += counts[i]
        return self._n
