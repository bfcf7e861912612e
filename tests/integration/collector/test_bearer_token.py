"""``--auth-token``: a real collector and a real router refuse requests without the
bearer token on every endpoint but /health (/metrics included), and the project's own
clients send it from ``TOKENTRACE_AUTH_TOKEN``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from collector_process import start_collector
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from prometheus_client.parser import text_string_to_metric_families

from tokentrace.serving.procs import free_ports

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret-token"
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def test_collector_requires_the_token_everywhere_but_health(tmp_path: Path) -> None:
    proc, info, _ = start_collector(tmp_path / "data", "--auth-token", TOKEN)
    api = f"http://{info['http']}"
    good = {"authorization": f"Bearer {TOKEN}"}
    try:
        assert httpx.get(f"{api}/health", timeout=10).status_code == 200
        for method, url in (
            ("POST", f"{api}/query"),
            ("GET", f"{api}/metrics"),
            ("GET", f"{api}/api/services"),
            ("GET", f"{api}/api/v3/services"),
            ("POST", f"http://{info['otlp_http']}/v1/traces"),
        ):
            resp = httpx.request(method, url, json={"sql": "SELECT 1"}, timeout=10)
            assert resp.status_code == 401, (url, resp.text)
        assert httpx.post(
            f"{api}/query", json={"sql": "SELECT 1 AS x"}, headers=good, timeout=10
        ).json()["rows"] == [[1]]
        assert httpx.get(f"{api}/api/services", headers=good, timeout=10).status_code == 200
        metrics = httpx.get(f"{api}/metrics", headers=good, timeout=10)
        assert "tokentrace_collector_spans_stored_total" in metrics.text, metrics.text

        empty = ExportTraceServiceRequest().SerializeToString()
        with grpc.insecure_channel(info["otlp_grpc"]) as channel:
            export = channel.unary_unary(EXPORT)
            with pytest.raises(grpc.RpcError) as refused:
                export(empty, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in (refused.value.details() or "")
            export(empty, timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),))

        # The CLI sends the token from the environment; without it, a clear refusal.
        query = [sys.executable, "-m", "tokentrace", "query", "SELECT 2 AS y"]
        query += ["--data-dir", str(tmp_path / "data"), "--format", "csv"]
        env = {**os.environ, "TOKENTRACE_AUTH_TOKEN": TOKEN}
        ok = subprocess.run(query, capture_output=True, text=True, timeout=60, env=env)
        assert ok.returncode == 0 and ok.stdout.splitlines() == ["y", "2"], ok.stderr
        env.pop("TOKENTRACE_AUTH_TOKEN")
        no = subprocess.run(query, capture_output=True, text=True, timeout=60, env=env)
        assert no.returncode != 0 and "bearer token" in no.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_router_requires_the_token_from_clients(tmp_path: Path) -> None:
    port, dead_prefill, dead_decode = free_ports(3)
    router = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokentrace",
            "router",
            "--prefill",
            f"http://127.0.0.1:{dead_prefill}",
            "--decode",
            f"http://127.0.0.1:{dead_decode}",
            "--port",
            str(port),
            "--auth-token",
            TOKEN,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and router.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = {"model": "x", "prompt": "hi", "max_tokens": 1}
        refused = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
        assert refused.status_code == 401
        let_in = httpx.post(
            f"{url}/v1/completions",
            json=body,
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        assert let_in.status_code != 401  # past the check: no worker is there to answer
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
        # Only the request let in reached the router's handler (and failed there). It is
        # counted when its span ends, just after its response: wait for that.
        deadline = time.monotonic() + 10
        while True:
            metrics = httpx.get(
                f"{url}/metrics", headers={"authorization": f"Bearer {TOKEN}"}, timeout=10
            ).text
            requests = {
                s.labels["status"]: s.value
                for f in text_string_to_metric_families(metrics)
                for s in f.samples
                if s.name == "tokentrace_requests_total"
            }
            if requests or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert requests == {"error": 1}, metrics
    finally:
        router.send_signal(signal.SIGTERM)
        router.wait(timeout=30)
