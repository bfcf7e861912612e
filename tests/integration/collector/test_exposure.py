"""A collector (and ``tokentrace ui``) refuses to listen beyond loopback without a
bearer token, unless told by name that it may."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from collector_process import start_collector

pytestmark = pytest.mark.timeout(120)


def _tokentrace(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokentrace", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("flag", "what"),
    [("--otlp-grpc", "OTLP/gRPC"), ("--otlp-http", "OTLP/HTTP"), ("--http", "the API")],
)
@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "192.0.2.1", "collector.example"])
def test_each_port_beyond_loopback_needs_a_token(
    tmp_path: Path, flag: str, what: str, host: str
) -> None:
    loopback = {"--otlp-grpc": "127.0.0.1:0", "--otlp-http": "127.0.0.1:0", "--http": "127.0.0.1:0"}
    loopback[flag] = f"{host}:0"
    out = _tokentrace(tmp_path, "collector", *(arg for pair in loopback.items() for arg in pair))
    assert out.returncode == 2, out.stderr
    assert f"{what} on {host.strip('[]')}" in out.stderr
    assert "--auth-token" in out.stderr and "--allow-unauthenticated" in out.stderr
    assert not (tmp_path / "collector.json").exists()


def test_with_a_token_it_listens_everywhere_and_requires_the_token(tmp_path: Path) -> None:
    proc, info, _ = start_collector(tmp_path, "--http", "0.0.0.0:0", "--auth-token", "s3cret")
    try:
        port = info["http"].rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{port}/query"
        assert httpx.post(url, json={"sql": "SELECT 1"}, timeout=10).status_code == 401
        ok = httpx.post(
            url, json={"sql": "SELECT 1"}, headers={"authorization": "Bearer s3cret"}, timeout=10
        )
        assert ok.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_allow_unauthenticated_says_so_by_name(tmp_path: Path) -> None:
    proc, info, _ = start_collector(tmp_path, "--otlp-http", "0.0.0.0:0", "--allow-unauthenticated")
    try:
        port = info["http"].rsplit(":", 1)[1]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_ui_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    out = _tokentrace(tmp_path, "ui", "--http", "0.0.0.0:0")
    assert out.returncode == 2 and "the page on 0.0.0.0" in out.stderr, out.stderr
