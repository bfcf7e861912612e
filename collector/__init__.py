"""The tokentrace collector: OTLP receivers → decode → derive → write-ahead log →
ClickHouse / OTLP forwarders.

Importing this package is cheap: the public names load their modules on first use, so
``tokentrace --help`` does not pull in grpc, FastAPI or ClickHouse clients.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .decode import DecodeError, SpanBatch, decode_request, parse_json, parse_protobuf
    from .derive import DerivedRows, derive_rows
    from .forward import ForwardConfig, OtlpForwarder
    from .pipeline import (
        ExportResult,
        Pipeline,
        PipelineConfig,
        PipelineFull,
        PipelineUnavailable,
    )
    from .service import Collector, CollectorConfig
    from .store import NsDatetime, QueryResult, Store, StoreError, open_store
    from .wal import WalConfig, WalError, WriteAheadLog

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
    "DecodeError": "decode",
    "SpanBatch": "decode",
    "decode_request": "decode",
    "parse_json": "decode",
    "parse_protobuf": "decode",
    "DerivedRows": "derive",
    "derive_rows": "derive",
    "ForwardConfig": "forward",
    "OtlpForwarder": "forward",
    "ExportResult": "pipeline",
    "Pipeline": "pipeline",
    "PipelineConfig": "pipeline",
    "PipelineFull": "pipeline",
    "PipelineUnavailable": "pipeline",
    "Collector": "service",
    "CollectorConfig": "service",
    "NsDatetime": "store",
    "QueryResult": "store",
    "Store": "store",
    "StoreError": "store",
    "open_store": "store",
    "WalConfig": "wal",
    "WalError": "wal",
    "WriteAheadLog": "wal",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
