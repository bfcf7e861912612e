"""Shared fixtures for integration tests: one real stack per test module, and a
throwaway certificate authority for the TLS tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tls_certs import TlsFiles, make_tls_files

from tokentrace.serving.stack import LocalStack


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    """Collector + router + 1 prefill + 2 decode workers as real processes on loopback
    ports chosen at run time, in a data directory of the module's own."""
    name = request.module.__name__.rsplit(".", 1)[-1]
    s = LocalStack(tmp_path_factory.mktemp(name), prefill_workers=1, decode_workers=2)
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A CA and a server certificate made for this test session, never reused."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))
