"""A minimal OTLP/gRPC trace sink in its own process, and tracer set-up for benchmarks.

The benchmarks need the exporter to really encode and send over loopback, or the
tracing-on side would skip the work it is meant to be charged for. The sink answers
every ``TraceService/Export`` with an empty ``ExportTraceServiceResponse`` without
parsing the request (``request_deserializer=None``), so it stays cheap and competes as
little as possible with the measured process for the machine's two cores. It counts
calls and bytes so a benchmark can check its spans actually arrived.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mpc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from tokentrace.instrument import Tracing, setup_tracing
from tokentrace.instrument.tracing import ENDPOINT_ENVS

__all__ = ["OtlpSink", "bench_tracing", "finish_decode_span", "without_endpoint_env"]

_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 5.0
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _serve(conn: mpc.Connection, exports: Any, received: Any, workers: int) -> None:
    """Sink process body: serve until the parent says stop or goes away (EOF)."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    service = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name
    empty = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()

    def export(request: bytes, context: Any) -> bytes:
        with exports.get_lock():
            exports.value += 1
        with received.get_lock():
            received.value += len(request)
        return empty

    handler = grpc.unary_unary_rpc_method_handler(
        export, request_deserializer=None, response_serializer=None
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=[("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)],
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {"Export": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send(port)
    try:
        conn.recv()  # "stop", or EOFError when the parent died
    except EOFError:
        pass
    finally:
        server.stop(grace=None)


class OtlpSink:
    """An OTLP/gRPC sink process on ``127.0.0.1`` and a port chosen at run time.

    Use as a context manager: the process is stopped on exit, errors included, and it
    stops by itself if the benchmark process dies (its pipe closes).
    """

    def __init__(self, workers: int = 2) -> None:
        ctx = mp.get_context("spawn")
        self._exports = ctx.Value("q", 0)
        self._received = ctx.Value("q", 0)
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve,
            args=(child_conn, self._exports, self._received, workers),
            name="otlp-sink",
            daemon=True,
        )
        self._child_conn = child_conn
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None
        return self._proc.pid

    @property
    def exports(self) -> int:
        """Export calls answered so far."""
        return int(self._exports.value)

    @property
    def received_bytes(self) -> int:
        """Serialized request bytes received so far."""
        return int(self._received.value)

    def start(self) -> OtlpSink:
        self._proc.start()
        self._child_conn.close()  # only the child holds its end: EOF when either dies
        if not self._conn.poll(_START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"OTLP sink did not start (exit code {self._proc.exitcode})")
        try:
            self.port = int(self._conn.recv())
        except EOFError:
            self.stop()
            raise RuntimeError(
                f"OTLP sink exited during start (exit code {self._proc.exitcode})"
            ) from None
        return self

    def stop(self) -> None:
        """Ask the sink to stop; terminate, then kill, if it does not. Idempotent."""
        if self._proc.pid is None:
            return
        try:
            self._conn.send("stop")
        except (BrokenPipeError, OSError):
            pass
        self._proc.join(_STOP_TIMEOUT_S)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(_STOP_TIMEOUT_S)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()

    def __enter__(self) -> OtlpSink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextmanager
def without_endpoint_env() -> Iterator[None]:
    """Hide the OTLP endpoint variables so "tracing off" really is off, whatever the
    shell running the benchmark exports."""
    saved = {k: os.environ.pop(k) for k in ENDPOINT_ENVS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def bench_tracing(endpoint: str | None, token_spans: str = "packed") -> Tracing:
    """A decode node's tracing as the worker sets it up: exporting to ``endpoint``, or
    off (no-op tracer) when it is None, regardless of the environment."""
    if endpoint is not None:
        return setup_tracing(
            role="decode", node_id="bench", endpoint=endpoint, token_spans=token_spans
        )
    with without_endpoint_env():
        return setup_tracing(role="decode", node_id="bench", token_spans=token_spans)


def finish_decode_span(
    tracing: Tracing,
    span: Any,
    recorder: Any,
    tokens: int,
    reason: str,
    end_ns: int,
) -> None:
    """What the worker's ``finish_spans`` does on the span thread when a request ends:
    the token emissions (packed or one span each), then the ``llm.decode`` span."""
    from tokentrace.schemas import attributes as A

    if recorder is not None:
        recorder.emit(tracing.tracer, span, tracing.packed)
        first = recorder.first_emission_s()
        if first is not None:
            span.set_attribute(A.GEN_AI_SERVER_TTFT, first)
    span.set_attribute(A.GEN_AI_USAGE_OUTPUT_TOKENS, tokens)
    span.set_attribute(A.GEN_AI_RESPONSE_FINISH_REASONS, [reason])
    span.end(end_time=end_ns)
