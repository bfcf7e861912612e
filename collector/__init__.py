"""The tokentrace collector: ``ingest`` (OTLP receivers → decode → derive → write-ahead
log → exporters, each on its own cursor: the ClickHouse writer and OTLP forwarders) and
``query`` (the SQL API, named reports, Jaeger's query API, the latency page), over one
``store``; ``service`` runs them as one process, ``cli`` is its commands.

Importing this package is cheap: the public names load their modules on first use, so
``tokentrace --help`` does not pull in grpc, FastAPI or ClickHouse clients.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .ingest.decode import SpanBatch, decode_request
    from .ingest.derive import DerivedRows, derive_rows
    from .ingest.forward import ForwardConfig, OtlpForwarder
    from .ingest.otlp_parse import DecodeError, parse_json, parse_protobuf
    from .ingest.pipeline import (
        ExportResult,
        Pipeline,
        PipelineConfig,
        PipelineFull,
        PipelineUnavailable,
    )
    from .ingest.wal import WalConfig, WalError, WriteAheadLog
    from .service import Collector, CollectorConfig
    from .store import NsDatetime, QueryResult, Store, StoreError, open_store

__all__ = [
    "Collector",
    "CollectorConfig",
    "DecodeError",
    "DerivedRows",
    "ExportResult",
    "ForwardConfig",
    "NsDatetime",
    "OtlpForwarder",
    "Pipeline",
    "PipelineConfig",
    "PipelineFull",
    "PipelineUnavailable",
    "QueryResult",
    "SpanBatch",
    "Store",
    "StoreError",
    "WalConfig",
    "WalError",
    "WriteAheadLog",
    "decode_request",
    "derive_rows",
    "open_store",
    "parse_json",
    "parse_protobuf",
]

_WHERE = {
    "DecodeError": "ingest.otlp_parse",
    "SpanBatch": "ingest.decode",
    "decode_request": "ingest.decode",
    "parse_json": "ingest.otlp_parse",
    "parse_protobuf": "ingest.otlp_parse",
    "DerivedRows": "ingest.derive",
    "derive_rows": "ingest.derive",
    "ForwardConfig": "ingest.forward",
    "OtlpForwarder": "ingest.forward",
    "ExportResult": "ingest.pipeline",
    "Pipeline": "ingest.pipeline",
    "PipelineConfig": "ingest.pipeline",
    "PipelineFull": "ingest.pipeline",
    "PipelineUnavailable": "ingest.pipeline",
    "Collector": "service",
    "CollectorConfig": "service",
    "NsDatetime": "store",
    "QueryResult": "store",
    "Store": "store",
    "StoreError": "store",
    "open_store": "store",
    "WalConfig": "ingest.wal",
    "WalError": "ingest.wal",
    "WriteAheadLog": "ingest.wal",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
