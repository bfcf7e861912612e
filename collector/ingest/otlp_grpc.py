"""OTLP/gRPC trace receiver: ``TraceService/Export`` → :meth:`Consumer.consume` (the pipeline).

Requests are deserialised here rather than by grpcio so a malformed protobuf gets
``INVALID_ARGUMENT`` with a message naming the problem (grpcio's own deserialiser
would answer an opaque ``INTERNAL``). A failure to log the export answers ``UNAVAILABLE``
and a full disk budget ``RESOURCE_EXHAUSTED`` with a ``RetryInfo`` (retry in a second);
OTLP exporters retry both.
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)

from tokentrace.runtime.auth import token_matches
from tokentrace.runtime.tls import TlsConfig

from .otlp_parse import DecodeError
from .pipeline import Consumer, ExportResult, PipelineFull, PipelineUnavailable

__all__ = ["OtlpGrpcConfig", "OtlpGrpcReceiver", "export_response"]

_log = logging.getLogger(__name__)

_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
RETRY_AFTER_S = 1
_RETRY_INFO_KEY = "google.rpc.retryinfo-bin"
_RETRY_INFO = RetryInfo(retry_delay=Duration(seconds=RETRY_AFTER_S)).SerializeToString()


@dataclass(frozen=True)
class OtlpGrpcConfig:
    host: str = "127.0.0.1"
    port: int = 4317  # 0 picks a free port
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_workers: int = 16

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"OTLP/gRPC port must be 0..65535, got {self.port!r}")
        if self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be positive, got {self.max_message_bytes!r}")
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers!r}")


def export_response(result: ExportResult) -> ExportTraceServiceResponse:
    """The OTLP response for ``result``: partial_success only when spans were rejected."""
    response = ExportTraceServiceResponse()
    if result.rejected_spans:
        response.partial_success.CopyFrom(
            ExportTracePartialSuccess(
                rejected_spans=result.rejected_spans, error_message=result.error_message
            )
        )
    return response


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, pipeline: Consumer) -> None:
        self._pipeline = pipeline

    def Export(self, request: Any, context: Any) -> ExportTraceServiceResponse:  # noqa: N802
        """``request`` is the raw serialized ExportTraceServiceRequest."""
        try:
            result = self._pipeline.consume(request)
        except DecodeError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except PipelineFull as exc:
            # OTLP exporters retry RESOURCE_EXHAUSTED only when told when to: RetryInfo.
            context.set_trailing_metadata(((_RETRY_INFO_KEY, _RETRY_INFO),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except PipelineUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return export_response(result)


class _BearerInterceptor(grpc.ServerInterceptor):
    """Answers UNAUTHENTICATED unless the call's ``authorization`` metadata carries the
    bearer token."""

    def __init__(self, token: str) -> None:
        self._token = token

        def refuse(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token (metadata authorization: Bearer <token>)",
            )

        self._refuse = grpc.unary_unary_rpc_method_handler(refuse)

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        metadata = dict(handler_call_details.invocation_metadata or ())
        if token_matches(self._token, metadata.get("authorization")):
            return continuation(handler_call_details)
        return self._refuse


class OtlpGrpcReceiver:
    """A threaded gRPC server; each Export blocks one worker thread until committed.
    With ``tls`` it listens on a TLS port only (plaintext clients fail the handshake)."""

    def __init__(
        self,
        config: OtlpGrpcConfig,
        pipeline: Consumer,
        auth_token: str | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self._pipeline = pipeline
        self._auth_token = auth_token
        self._tls = tls
        self._server: grpc.Server | None = None
        self.port: int | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port if self.port is not None else self.config.port}"

    def start(self) -> None:
        """Bind and serve; idempotent. Raises OSError if the address cannot be bound."""
        if self._server is not None:
            return
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self.config.max_workers, thread_name_prefix="otlp-grpc"
            ),
            options=[
                ("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", self.config.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            interceptors=[_BearerInterceptor(self._auth_token)] if self._auth_token else None,
        )
        servicer = _TraceService(self._pipeline)
        handler = grpc.method_handlers_generic_handler(
            _SERVICE,
            {
                "Export": grpc.unary_unary_rpc_method_handler(
                    servicer.Export,
                    request_deserializer=None,  # raw bytes: decode errors are ours to report
                    response_serializer=ExportTraceServiceResponse.SerializeToString,
                ),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        host = self.config.host
        target = f"[{host}]:{self.config.port}" if ":" in host else f"{host}:{self.config.port}"
        try:
            if self._tls is None:
                port = server.add_insecure_port(target)
            else:
                credentials = grpc.ssl_server_credentials([self._tls.read_pair()])
                port = server.add_secure_port(target, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot bind OTLP/gRPC receiver to {target}: {exc}") from exc
        if port == 0:
            raise OSError(f"cannot bind OTLP/gRPC receiver to {target}")
        server.start()
        self._server = server
        self.port = port
        _log.info(
            "OTLP/gRPC receiver listening on %s%s", self.address, " (TLS)" if self._tls else ""
        )

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop taking new RPCs and wait for in-flight exports; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace_s).wait()
