"""Hostile and malformed OTLP against a real ``tokentrace collector`` process.

Each case gets a clear refusal: of the whole request (HTTP 400/413, gRPC
``INVALID_ARGUMENT``/``RESOURCE_EXHAUSTED``) or of just its bad spans, through OTLP's
partial success, while the valid spans sent with them are stored. The collector keeps
serving, with flat memory. Tests run in file order: the memory test repeats every case,
the last one checks a fresh export is still stored.
"""

from __future__ import annotations

import gzip
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from collector_process import start_collector
from otlp_payloads import (
    PROTOBUF,
    export_grpc,
    new_trace_id,
    post,
    request,
    span,
)

pytestmark = pytest.mark.timeout(300)

T0_NS = 1_700_000_000_000_000_000
MIB = 1 << 20
BIG_BYTES = 100 * MIB  # past the receivers' 64 MiB limit


@dataclass
class Running:
    proc: subprocess.Popen[str]
    info: dict[str, Any]

    @property
    def api(self) -> str:
        return f"http://{self.info['http']}"

    @property
    def otlp_http(self) -> str:
        return f"http://{self.info['otlp_http']}/v1/traces"

    @property
    def otlp_grpc(self) -> str:
        return str(self.info["otlp_grpc"])


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    data_dir: Path = tmp_path_factory.mktemp("hostile")
    proc, info, _ = start_collector(data_dir)
    yield Running(proc, info)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


# -- oversized requests ------------------------------------------------------------------


def _status_line_for_headers_only(address: str, *extra_headers: str) -> bytes:
    """Send only the headers of a POST declaring a 100 MB body; the status line the
    collector answers with before any of the body is sent."""
    host, port = address.rsplit(":", 1)
    head = "\r\n".join(
        (
            "POST /v1/traces HTTP/1.1",
            f"Host: {address}",
            f"Content-Type: {PROTOBUF}",
            f"Content-Length: {BIG_BYTES}",
            *extra_headers,
            "",
            "",
        )
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.split(b"\r\n", 1)[0]


def _big_chunks() -> Iterator[bytes]:
    chunk = b"\x00" * MIB
    for _ in range(BIG_BYTES // MIB):
        yield chunk


def _oversized_cases(collector: Running) -> None:
    """Every way to send 100 MB: each refused with 413 / RESOURCE_EXHAUSTED."""
    # Refused on its Content-Length, before the body is sent at all...
    for extra in ((), ("Expect: 100-continue",)):
        status = _status_line_for_headers_only(collector.info["otlp_http"], *extra)
        assert status.startswith(b"HTTP/1.1 413"), (extra, status)
    # ... and when it is sent anyway, the client still gets to read the 413.
    answer = post(collector.otlp_http, b"\x00" * BIG_BYTES)
    assert answer.status == 413
    assert (
        answer.message == f"request body of {BIG_BYTES} bytes (Content-Length) exceeds {64 * MIB}"
    )
    # Without a Content-Length (chunked), it is read only up to the limit.
    response = httpx.post(
        collector.otlp_http,
        content=_big_chunks(),
        headers={"content-type": PROTOBUF},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json() == {"code": 8, "message": f"request body exceeds {64 * MIB} bytes"}
    # 100 KB of gzip inflating to 100 MB.
    bomb = gzip.compress(b"\x00" * BIG_BYTES)
    answer = post(collector.otlp_http, bomb, **{"content-encoding": "gzip"})
    assert len(bomb) < MIB and answer.status == 413
    assert answer.message == f"gzip body inflates beyond {64 * MIB} bytes"
    # gRPC refuses it itself, by grpc.max_receive_message_length.
    answer = export_grpc(collector.otlp_grpc, b"\x00" * BIG_BYTES)
    assert answer.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"larger than max ({BIG_BYTES} vs. {64 * MIB})" in answer.message


def test_a_100_mb_request_is_refused_with_413_or_resource_exhausted(collector: Running) -> None:
    _oversized_cases(collector)
    # A body at the limit is read (and here refused for what it is, not for its size).
    answer = post(collector.otlp_http, b"\xff" * (64 * MIB))
    assert answer.status == 400 and "invalid OTLP protobuf" in answer.message


def test_valid_exports_still_go_through(collector: Running) -> None:
    trace_id = new_trace_id()
    body = request(({}, [span(trace_id, 1, T0_NS, T0_NS + 10)])).SerializeToString()
    assert post(collector.otlp_http, body).status == 200
    assert export_grpc(collector.otlp_grpc, body).grpc_code == grpc.StatusCode.OK
