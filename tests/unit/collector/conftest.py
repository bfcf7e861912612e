"""What the collector's unit tests share: a real chDB store per test module (chDB binds
one data path per process, so a module's tests share one) and a real write-ahead log
directory per test. Its directory on ``sys.path`` also makes ``otlp_builders`` (beside
this file) importable from the tests in ingest/ and query/ below."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tokentrace.collector import Store, open_store
from tokentrace.collector.ingest.wal import WalConfig, WriteAheadLog


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    path: Path = tmp_path_factory.mktemp("chdb")
    s = open_store(f"chdb://{path}")
    yield s
    s.close()


@pytest.fixture
def wal(tmp_path: Path) -> Iterator[WriteAheadLog]:
    log = WriteAheadLog(WalConfig(str(tmp_path / "wal")))
    yield log
    log.close()
