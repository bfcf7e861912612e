"""The collector's configuration refuses what would be unsafe or cannot work, before
anything starts."""

from __future__ import annotations

import pytest

from tokentrace.collector.service import CollectorConfig
from tokentrace.collector.sqlguard import QueryLimits
from tokentrace.collector.wal import WalConfig


def _config(**kw: object) -> CollectorConfig:
    return CollectorConfig(**{"dsn": "chdb:///tmp/x", "wal": WalConfig("/tmp/w"), **kw})  # type: ignore[arg-type]


def test_the_defaults_listen_on_loopback_and_need_nothing() -> None:
    _config().validate()


def test_query_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_result_rows"):
        _config(query_limits=QueryLimits(max_result_rows=0)).validate()
    with pytest.raises(ValueError, match="max_memory_bytes"):
        _config(query_limits=QueryLimits(max_memory_bytes=1024)).validate()
