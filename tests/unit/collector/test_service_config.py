"""The collector's configuration refuses what would be unsafe or cannot work, before
anything starts: listening beyond loopback without a token, a query user on the
embedded store, creating one without a password."""

from __future__ import annotations

import pytest

from tokentrace.collector.ingest.otlp_grpc import OtlpGrpcConfig
from tokentrace.collector.ingest.wal import WalConfig
from tokentrace.collector.query.api import ApiConfig
from tokentrace.collector.query.sqlguard import QueryLimits
from tokentrace.collector.service import CollectorConfig

SERVER = "http://clickhouse:8123"


def _config(**kw: object) -> CollectorConfig:
    return CollectorConfig(**{"dsn": "chdb:///tmp/x", "wal": WalConfig("/tmp/w"), **kw})  # type: ignore[arg-type]


def test_the_defaults_listen_on_loopback_and_need_nothing() -> None:
    _config().validate()


def test_any_port_beyond_loopback_needs_a_token_or_saying_so() -> None:
    exposed = {"otlp_grpc": OtlpGrpcConfig(host="0.0.0.0"), "api": ApiConfig(host="10.1.2.3")}
    with pytest.raises(ValueError, match=r"OTLP/gRPC on 0\.0\.0\.0, the API on 10\.1\.2\.3"):
        _config(**exposed).validate()
    _config(auth_token="t", **exposed).validate()
    _config(allow_unauthenticated=True, **exposed).validate()


def test_query_users_are_for_servers_and_created_only_with_a_password() -> None:
    with pytest.raises(ValueError, match="embedded store has no users"):
        _config(query_user="tokentrace_query").validate()
    with pytest.raises(ValueError, match="password"):
        _config(dsn=SERVER, query_user="tokentrace_query", create_query_user=True).validate()
    _config(
        dsn=SERVER, query_user="tokentrace_query", query_password="p", create_query_user=True
    ).validate()


def test_query_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_result_rows"):
        _config(query_limits=QueryLimits(max_result_rows=0)).validate()
    with pytest.raises(ValueError, match="max_memory_bytes"):
        _config(query_limits=QueryLimits(max_memory_bytes=1024)).validate()
