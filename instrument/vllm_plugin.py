"""tokentrace's vLLM plugin, loaded through the ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` once in each of its processes (API server, engine core,
workers). What it does there:

- **NIXL without its progress thread** (on CPU, or when
  ``TOKENTRACE_NIXL_PROGRESS_THREAD=0``): vLLM's NixlConnector creates its NIXL agent
  with NIXL's default progress thread, which polls UCX with a zero timeout and spins a
  whole core per server even when idle; on a small CPU host the starved decode side's
  KV read then completes after the prefill side's KV lease expired. Without the thread,
  vLLM's own per-step polling drives the transfers. This does not depend on tracing.
- **Spans**, only when ``TOKENTRACE_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``
  is set: in the API server, ``llm.prefill`` for a request prefilled for a remote
  decode (its ``traceparent`` is added to the ``kv_transfer_params`` the response
  returns), otherwise ``llm.decode`` with one ``llm.token`` per output emission. The
  parent is the request's ``traceparent`` header, else the ``traceparent`` inside its
  ``kv_transfer_params``. A streamed request's emissions are the chunks vLLM's serving
  layer writes, each recorded as it goes out (what every benchmark client times, and
  counts: the chat role chunk as an emission of 0 tokens, and steps the API server
  merged into one chunk as one emission of their tokens); a non-streamed one's are the
  engine core's output timestamps per step (monotonic, the same clock across
  processes). Spans are built on the span thread after the request finishes.

No Prometheus metrics: vLLM's own ``/metrics`` already has TTFT, ITL and the
NixlConnector's transfer histograms, and the KV reads happen in vLLM's worker
processes, whose registries the API server does not serve; tokentrace's ITL histogram
could join vLLM's global registry in the API server (``_end_spans`` has the recorder),
but only with a model label the hooked internals do not carry.

Without an endpoint the plugin starts no thread and wraps nothing for tracing. It
follows vLLM internals only where no public hook exists, checks that each target
exists, and logs one warning (never raises) on a vLLM version it was not built for.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context

from tokentrace.instrument import spans
from tokentrace.instrument.propagation import extract, inject
from tokentrace.instrument.recorder import TokenRecorder
from tokentrace.instrument.tracing import Tracing, resolve_endpoint, setup_tracing
from tokentrace.schemas import attributes as A

# A child of vLLM's logger, so these lines appear in vLLM's log with its format.
log = logging.getLogger("vllm.tokentrace")

SUPPORTED_VLLM = ("0.32.",)
NIXL_PROGRESS_THREAD_ENV = "TOKENTRACE_NIXL_PROGRESS_THREAD"
ROLE_ENV = "TOKENTRACE_ROLE"
# Keys tokentrace adds to kv_transfer_params (vLLM passes unknown keys through).
KV_SOURCE_KEY = "tokentrace_node_id"  # the prefill node, set by the prefill server
KV_PARENT_KEY = "tokentrace_parent"  # the decode span, set by the decode API server
_PATCHED = "_tokentrace_patched"

_registered = False
# The HTTP request being handled in this task: (parent context, X-Request-Id).
_http_request: contextvars.ContextVar[tuple[Context, str | None] | None] = contextvars.ContextVar(
    "tokentrace_http_request", default=None
)


def register() -> None:
    """vLLM's entry point. Never raises: a plugin must not take vLLM down."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        if _nixl_progress_thread_off():
            _patch_nixl_agent()
        if resolve_endpoint(None) is None:
            return
        _check_version()
        _install_tracing()
    except Exception:
        log.warning("tokentrace: the vLLM plugin failed; vLLM runs untraced", exc_info=True)


# -- NIXL ---------------------------------------------------------------------------


def _nixl_progress_thread_off() -> bool:
    setting = os.environ.get(NIXL_PROGRESS_THREAD_ENV)
    if setting is not None:
        return setting.strip().lower() in ("0", "false", "no", "off")
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:
        return False


def _patch_nixl_agent() -> None:
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError:
        return
    original = nixl_agent.__init__
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def __init__(self: Any, agent_name: str, nixl_conf: Any = None, *args: Any, **kw: Any) -> None:
        if nixl_conf is None:
            nixl_conf = nixl_agent_config(enable_prog_thread=False)
        else:
            nixl_conf.enable_pthread = False
        original(self, agent_name, nixl_conf, *args, **kw)

    setattr(__init__, _PATCHED, True)
    nixl_agent.__init__ = __init__
    log.info(
        "tokentrace: NIXL agents start without NIXL's progress thread (it spins a core "
        "per agent on CPU); vLLM's own polling drives transfers. %s=1 keeps the thread.",
        NIXL_PROGRESS_THREAD_ENV,
    )


# -- tracing ------------------------------------------------------------------------


def _check_version() -> None:
    try:
        import vllm

        version = str(vllm.__version__)
    except Exception:
        return
    if not version.startswith(SUPPORTED_VLLM):
        log.warning(
            "tokentrace: vLLM %s is not a version this plugin was built for (%s); "
            "spans that depend on vLLM internals may be missing",
            version,
            ", ".join(v + "x" for v in SUPPORTED_VLLM),
        )


def _patch(owner: Any, name: str, make: Any) -> bool:
    """Replace ``owner.name`` with ``make(original)``; False (and a log line) when the
    target does not exist in this vLLM."""
    original = getattr(owner, name, None)
    if original is None:
        log.warning("tokentrace: %s.%s not found; skipping that hook", owner.__name__, name)
        return False
    if getattr(original, _PATCHED, False):
        return True
    wrapper = make(original)
    setattr(wrapper, _PATCHED, True)
    setattr(owner, name, wrapper)
    return True


def _install_tracing() -> None:
    try:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.serve.engine.serving import BaseServing
        from vllm.v1.engine.output_processor import OutputProcessor
    except ImportError as exc:
        log.warning("tokentrace: vLLM internals this plugin hooks are missing (%s); no spans", exc)
        return
    state = _TraceState()

    def base_request_id(original: Any) -> Any:
        # Called in the HTTP handler's task for every completion and chat request, with
        # the raw request: remember its trace context for add_request below.
        def wrapper(raw_request: Any, default: str | None = None) -> Any:
            try:
                if raw_request is not None:
                    headers = raw_request.headers
                    _http_request.set((extract(dict(headers)), headers.get("x-request-id")))
            except Exception:
                log.debug("tokentrace: reading request headers failed", exc_info=True)
            return original(raw_request, default)

        return staticmethod(wrapper)

    def add_request(original: Any) -> Any:
        @functools.wraps(original)
        def wrapper(self: Any, request: Any, *args: Any, **kw: Any) -> Any:
            result = original(self, request, *args, **kw)
            try:
                state.start(request)
            except Exception:
                log.debug("tokentrace: could not trace request", exc_info=True)
            return result

        return wrapper

    def process_outputs(original: Any) -> Any:
        @functools.wraps(original)
        def wrapper(self: Any, engine_core_outputs: Any, *args: Any, **kw: Any) -> Any:
            if state.requests:
                try:
                    state.outputs(engine_core_outputs, _arg(args, kw, 0, "engine_core_timestamp"))
                except Exception:
                    log.debug("tokentrace: recording outputs failed", exc_info=True)
            return original(self, engine_core_outputs, *args, **kw)

        return wrapper

    def abort_requests(original: Any) -> Any:
        @functools.wraps(original)
        def wrapper(self: Any, request_ids: Any, *args: Any, **kw: Any) -> Any:
            aborted = original(self, request_ids, *args, **kw)
            try:
                for request_id in aborted or ():
                    state.finish(request_id, "abort")
            except Exception:
                log.debug("tokentrace: recording an abort failed", exc_info=True)
            return aborted

        return wrapper

    # _base_request_id is a staticmethod: wrap the function, rebind as staticmethod.
    raw = BaseServing.__dict__.get("_base_request_id")
    if isinstance(raw, staticmethod) and not getattr(raw.__func__, _PATCHED, False):
        wrapped = base_request_id(raw.__func__)
        setattr(wrapped.__func__, _PATCHED, True)
        setattr(BaseServing, "_base_request_id", wrapped)  # noqa: B010
    else:
        log.warning("tokentrace: BaseServing._base_request_id not found; headers unseen")

    def stream_generator(chat: bool) -> Any:
        # The serving layer's SSE generator: what it yields is what the client times.
        # Its request id names the engine requests it streams (add_request links them
        # by it: chat "<id>", completions "<id>-<prompt>"); context variables would not
        # do, asyncio can carry one request's into another's task.
        index = 2 if chat else 3

        def make(original: Any) -> Any:
            @functools.wraps(original)
            async def wrapper(self: Any, *args: Any, **kw: Any) -> Any:
                request_id = str(_arg(args, kw, index, "request_id"))
                stream = _Stream(state, chat)
                state.streams[request_id] = stream
                try:
                    async for event in original(self, *args, **kw):
                        try:
                            stream.on_event(event)
                        except Exception:
                            log.debug("tokentrace: recording a chunk failed", exc_info=True)
                        yield event
                finally:
                    state.streams.pop(request_id, None)
                    try:
                        stream.close()
                    except Exception:
                        log.debug("tokentrace: finishing a stream failed", exc_info=True)

            return wrapper

        return make

    _patch(OutputProcessor, "add_request", add_request)
    _patch(OutputProcessor, "process_outputs", process_outputs)
    _patch(OutputProcessor, "abort_requests", abort_requests)
    _patch(OpenAIServingCompletion, "completion_stream_generator", stream_generator(False))
    _patch(OpenAIServingChat, "chat_completion_stream_generator", stream_generator(True))
    _install_kv_tracing(state)
    log.info("tokentrace: tracing vLLM requests to %s", resolve_endpoint(None))


@dataclass
class _Request:
    span: trace.Span
    prefill: bool
    recorder: TokenRecorder
    arrival_mono_s: float
    ctx: Context = field(default_factory=Context)
    # Streamed: the steps' (time, tokens, step, batch) not yet in a chunk, and the finish
    # reason once the engine gave it (the stream ends the request, not the engine).
    stream: _Stream | None = None
    pending: list[tuple[int, int, int, int]] = field(default_factory=list)
    reason: str | None = None


class _Stream:
    """One SSE response of vLLM's serving layer and the engine requests it streams.

    Threading: on vLLM's asyncio loop, as the output processor. With exactly one
    request (``n`` = 1, one prompt: what benchmark clients send), each chunk with
    ``choices`` is recorded as an emission when it is yielded, carrying the tokens of
    the engine steps since the last one (for chat, the first, the role chunk, carries
    none). Otherwise the steps are recorded as they came, when the stream ends.
    """

    def __init__(self, state: _TraceState, chat: bool) -> None:
        self.state = state
        self.chat = chat
        self.request_ids: list[str] = []
        self.chunks = 0

    def on_event(self, event: str) -> None:
        if '"choices":[{' not in event or len(self.request_ids) != 1:
            return
        req = self.state.requests.get(self.request_ids[0])
        if req is None:
            return
        now = time.monotonic_ns()
        first = self.chunks == 0
        self.chunks += 1
        if self.chat and first:  # the role chunk, sent with the first output
            step, batch = req.pending[-1][2:] if req.pending else (0, 0)
            req.recorder.record_at(now, 0, step, batch)
            return
        tokens = sum(p[1] for p in req.pending)
        step, batch = req.pending[-1][2:] if req.pending else (0, 0)
        req.pending.clear()
        req.recorder.record_at(now, tokens, step, batch)

    def close(self) -> None:
        for request_id in self.request_ids:
            req = self.state.requests.get(request_id)
            if req is None:
                continue
            for t_ns, n, step, batch in req.pending:  # steps no chunk carried
                req.recorder.record_at(t_ns, n, step, batch)
            req.pending.clear()
            self.state.finish(request_id, req.reason or "abort")


class _TraceState:
    """Requests being traced in this API server process.

    Threading: vLLM calls the output processor from its asyncio loop thread; spans are
    finished on the span thread (``Tracing.defer``).
    """

    def __init__(self) -> None:
        self._tracing: Tracing | None = None
        self._lock = threading.Lock()
        self.requests: dict[str, _Request] = {}
        self.streams: dict[str, _Stream] = {}  # by the serving layer's request id
        self._step = 0

    @property
    def tracing(self) -> Tracing:
        # Created on first use, so processes that never serve a request (engine core,
        # workers) start no exporter thread.
        if self._tracing is None:
            with self._lock:
                if self._tracing is None:
                    self._tracing = setup_tracing(
                        role=os.environ.get(ROLE_ENV, "decode"),
                        service_name="vllm",
                        logger=log,  # dropped spans are reported in vLLM's own log
                    )
        return self._tracing

    def start(self, request: Any) -> None:
        params = getattr(request, "sampling_params", None)
        if params is None:  # pooling requests: nothing to time
            return
        extra = getattr(params, "extra_args", None) or {}
        kv = extra.get("kv_transfer_params") or {}
        http = _http_request.get()
        parent, header_id = http if http is not None else (Context(), None)
        if not trace.get_current_span(parent).get_span_context().is_valid:
            parent = extract(kv)
        prefill = bool(kv.get("do_remote_decode"))
        arrival_wall_s = float(getattr(request, "arrival_time", 0.0) or time.time())
        arrival_mono_s = time.monotonic() - max(0.0, time.time() - arrival_wall_s)
        input_tokens = len(getattr(request, "prompt_token_ids", None) or [])
        request_id = header_id or str(getattr(request, "external_req_id", None) or "")
        max_tokens = getattr(params, "max_tokens", None)
        if not isinstance(max_tokens, int):
            max_tokens = None
        attrs = spans.request_attributes(request_id, input_tokens, max_tokens=max_tokens)
        start = spans.start_prefill if prefill else spans.start_decode
        span = start(self.tracing.tracer, parent, int(arrival_wall_s * 1e9), attrs)
        if kv.get("do_remote_prefill") and isinstance(kv, dict):
            # Travels with the request to the engine core and, on the connector's
            # metadata, to the worker that reads the KV: the llm.kv_transfer parent.
            carrier: dict[str, str] = {}
            inject(carrier, trace.set_span_in_context(span))
            if "traceparent" in carrier:
                kv[KV_PARENT_KEY] = carrier["traceparent"]
        stream = self._stream_of(str(getattr(request, "external_req_id", None) or ""))
        self.requests[request.request_id] = _Request(
            span=span,
            prefill=prefill,
            # vLLM's output processor does not see how many prompt tokens a step
            # scheduled, so its steps' prefill counts are stored as unknown, not 0.
            recorder=TokenRecorder(max(1, max_tokens or 16) + 1, step_prefill=False),
            arrival_mono_s=arrival_mono_s,
            ctx=trace.set_span_in_context(span),
            stream=stream,
        )
        if stream is not None:
            stream.request_ids.append(request.request_id)

    def _stream_of(self, external_id: str) -> _Stream | None:
        """The stream an engine request (by its external id) belongs to, if any: chat
        names it "<id>" (several prompts "<id>_<i>"), completions "<id>-<i>"."""
        stream = self.streams.get(external_id)
        if stream is None:
            for sep in ("-", "_"):
                head, _, tail = external_id.rpartition(sep)
                if head and tail.isdigit() and head in self.streams:
                    return self.streams[head]
        return stream

    def outputs(self, outputs: Any, timestamp_s: float | None) -> None:
        """Hot path: one call per engine step with every request's new tokens."""
        self._step += 1
        step, batch = self._step, len(outputs)
        t_ns = int(timestamp_s * 1e9) if timestamp_s else time.monotonic_ns()
        requests = self.requests
        for out in outputs:
            req = requests.get(out.request_id)
            if req is None:
                continue
            n = len(out.new_token_ids)
            if n:
                if req.stream is not None:
                    req.pending.append((t_ns, n, step, batch))
                else:
                    req.recorder.record_at(t_ns, n, step, batch)
            reason = out.finish_reason
            if reason is not None:
                if req.prefill and out.kv_transfer_params is not None:
                    # The decode side joins this trace through kv_transfer_params, and
                    # learns which node its KV comes from.
                    inject(out.kv_transfer_params, req.ctx)
                    out.kv_transfer_params[KV_SOURCE_KEY] = self.tracing.node_id
                if req.stream is not None:
                    req.reason = str(reason)  # its stream's last chunk is still to come
                else:
                    self.finish(out.request_id, str(reason))

    def finish(self, request_id: str, reason: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        self.tracing.defer(lambda: _end_spans(self.tracing, req, reason))


def _end_spans(tracing: Tracing, req: _Request, reason: str) -> None:
    rec = req.recorder
    span = req.span
    if req.prefill:
        span.set_attribute(A.GEN_AI_RESPONSE_FINISH_REASONS, [reason.lower()])
        span.end(end_time=rec.emission_wall_ns(0) if rec.emissions else None)
        return
    rec.start_mono_ns = int(req.arrival_mono_s * 1e9)
    rec.emit(tracing.tracer, span, tracing.packed)
    spans.end_decode(
        span,
        output_tokens=rec.tokens,
        finish_reason=reason.lower(),
        ttft_s=rec.first_emission_s(),
        error="aborted" if reason == "abort" else None,
        end_ns=rec.emission_wall_ns(rec.emissions - 1) if rec.emissions else None,
    )


# -- KV transfers (NixlConnector, pull mode) ------------------------------------------


@dataclass
class _Read:
    """One request's KV read on the decode worker: posted at ``post_ns`` (wall clock);
    bytes, descriptors and NIXL's own timing summed over its transfer handles."""

    parent: str | None
    src_node: str
    post_ns: int
    blocks: int
    bytes: int = 0
    descs: int = 0
    start_us: float | None = None
    end_us: float | None = None

    def add(self, res: Any) -> None:
        """One finished handle's NIXL telemetry (times in µs on NIXL's clock)."""
        self.bytes += int(res.totalBytes)
        self.descs += int(res.descCount)
        end = res.startTime + res.postDuration + res.xferDuration
        self.start_us = (
            res.startTime if self.start_us is None else min(self.start_us, res.startTime)
        )
        self.end_us = end if self.end_us is None else max(self.end_us, end)


def _arg(args: tuple[Any, ...], kw: dict[str, Any], index: int, name: str) -> Any:
    """A wrapped method's argument, however vLLM passed it."""
    return kw[name] if name in kw else (args[index] if len(args) > index else None)


def _count(block_ids: Any) -> int:
    """Blocks in vLLM's block ids: a flat list, or one list per KV-cache group."""
    if block_ids and isinstance(block_ids[0], (list, tuple)):
        return sum(len(group) for group in block_ids)
    return len(block_ids or ())


def _install_kv_tracing(state: _TraceState) -> None:
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker import (
            NixlBaseConnectorWorker,
        )
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import (
            NixlConnectorMetadata,
        )
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import (
            NixlPullConnectorWorker,
        )
    except ImportError as exc:
        log.warning("tokentrace: no NixlConnector hooks in this vLLM (%s); no KV spans", exc)
        return
    reads: dict[str, _Read] = {}

    def add_new_req_to_recv(original: Any) -> Any:
        # Engine core: copy tokentrace's keys onto the metadata the worker receives.
        @functools.wraps(original)
        def wrapper(self: Any, *args: Any, **kw: Any) -> Any:
            result = original(self, *args, **kw)
            try:
                request_id = _arg(args, kw, 0, "request_id")
                kv = _arg(args, kw, 2, "kv_transfer_params")
                meta = self.reqs_to_recv.get(request_id)
                if meta is not None and isinstance(kv, dict):
                    meta.tokentrace = (
                        kv.get(KV_PARENT_KEY) or kv.get("traceparent"),
                        str(kv.get(KV_SOURCE_KEY) or kv.get("remote_engine_id")),
                    )
            except Exception:
                log.debug("tokentrace: KV metadata hook failed", exc_info=True)
            return result

        return wrapper

    def read_blocks_for_req(original: Any) -> Any:
        # Worker: the read is posted now if the remote agent is known (else vLLM
        # handshakes first and calls this again).
        @functools.wraps(original)
        def wrapper(self: Any, *args: Any, **kw: Any) -> Any:
            try:
                req_id = _arg(args, kw, 0, "req_id")
                meta = _arg(args, kw, 1, "meta")
                info = getattr(meta, "tokentrace", None)
                remote = getattr(meta, "remote", None)
                if (
                    info is not None
                    and remote is not None
                    and req_id not in reads
                    and remote.engine_id in getattr(self, "_remote_agents", {})
                ):
                    reads[req_id] = _Read(
                        info[0], info[1], time.time_ns(), _count(remote.block_ids)
                    )
            except Exception:
                log.debug("tokentrace: KV read hook failed", exc_info=True)
            return original(self, *args, **kw)

        return wrapper

    def pop_done_transfers(original: Any) -> Any:
        @functools.wraps(original)
        def wrapper(self: Any, *args: Any, **kw: Any) -> Any:
            if not reads:
                return original(self, *args, **kw)
            transfers = _arg(args, kw, 0, "transfers") or {}
            handles = {h: r for r, hs in transfers.items() if r in reads for h in hs}
            agent = self.nixl_wrapper
            telemetry = agent.get_xfer_telemetry

            def observe(handle: Any) -> Any:
                res = telemetry(handle)
                try:
                    read = reads.get(handles.get(handle, ""))
                    if read is not None and res is not None:
                        read.add(res)
                except Exception:
                    log.debug("tokentrace: reading NIXL telemetry failed", exc_info=True)
                return res

            agent.get_xfer_telemetry = observe
            try:
                done, failed = original(self, *args, **kw)
            finally:
                del agent.get_xfer_telemetry  # back to the class's method
            for req_id in (set(done) | set(failed)) & reads.keys():
                read = reads.pop(req_id)
                ok = req_id not in failed
                state.tracing.defer(lambda r=read, ok=ok: _kv_span(state.tracing, r, ok))
            return done, failed

        return wrapper

    _patch(NixlConnectorMetadata, "add_new_req_to_recv", add_new_req_to_recv)
    _patch(NixlPullConnectorWorker, "_read_blocks_for_req", read_blocks_for_req)
    _patch(NixlBaseConnectorWorker, "_pop_done_transfers", pop_done_transfers)


def _kv_span(tracing: Tracing, read: _Read, ok: bool) -> None:
    """``llm.kv_transfer`` from the read's post for NIXL's measured duration."""
    duration_ns = 0
    if read.start_us is not None and read.end_us is not None:
        duration_ns = int((read.end_us - read.start_us) * 1000)
    spans.kv_transfer(
        tracing.tracer,
        extract({"traceparent": read.parent} if read.parent else None),
        read.post_ns,
        read.post_ns + duration_ns,
        bytes_moved=read.bytes,
        blocks=read.blocks,
        backend="nixl/UCX",
        src_node=read.src_node,
        dst_node=tracing.node_id,
        descriptors=read.descs,
        error=None if ok else "NIXL transfer failed",
    )
