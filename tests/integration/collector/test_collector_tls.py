"""``--tls-cert``/``--tls-key``: a real collector serves OTLP/gRPC, OTLP/HTTP and its API
over TLS only, with a certificate from a CA made for the test session; the project's
own clients verify it against that CA and refuse it without."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from collector_process import start_collector
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from tls_certs import TlsFiles

from tokentrace.cli import main
from tokentrace.instrument import setup_tracing
from tokentrace.runtime.tls import CA_CERT_ENV

pytestmark = pytest.mark.timeout(120)

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
T0_NS = 1_700_000_000_000_000_000


@dataclass
class Running:
    proc: subprocess.Popen[str]
    data_dir: Path
    info: dict[str, Any]
    ready: str


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles) -> Iterator[Running]:
    data_dir = tmp_path_factory.mktemp("tls-collector")
    proc, info, ready = start_collector(
        data_dir, "--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key)
    )
    yield Running(proc, data_dir, info, ready)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def _trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def _export_request(service: str, spans: int) -> bytes:
    """``spans`` spans of one trace from a resource named ``service``."""
    trace_id = os.urandom(16)
    return ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(
                    attributes=[KeyValue(key="service.name", value=AnyValue(string_value=service))]
                ),
                scope_spans=[
                    ScopeSpans(
                        spans=[
                            Span(
                                trace_id=trace_id,
                                span_id=(i + 1).to_bytes(8, "big"),
                                name="tls.test",
                                kind=Span.SPAN_KIND_INTERNAL,
                                start_time_unix_nano=T0_NS + i,
                                end_time_unix_nano=T0_NS + i + 1000,
                            )
                            for i in range(spans)
                        ]
                    )
                ],
            )
        ]
    ).SerializeToString()


def _stored_spans(running: Running, ca: Path, service: str) -> int:
    """Spans of ``service`` in the store, read through /query over HTTPS."""
    response = httpx.post(
        f"{running.info['http_url']}/query",
        json={"sql": f"SELECT count() FROM otel_traces WHERE ServiceName = '{service}'"},
        verify=_trusting(ca),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return int(response.json()["rows"][0][0])


def test_collector_json_and_ready_line_say_https(collector: Running) -> None:
    info = collector.info
    assert info["tls"] is True
    assert info["http_url"] == f"https://{info['http']}"
    assert info["otlp_grpc_url"] == f"https://{info['otlp_grpc']}"
    assert info["otlp_http_url"] == f"https://{info['otlp_http']}/v1/traces"
    assert collector.ready.rstrip().endswith("tls=on")


def test_otlp_grpc_export_over_tls_is_stored(collector: Running, tls_files: TlsFiles) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_files.ca.read_bytes())
    with grpc.secure_channel(collector.info["otlp_grpc"], credentials) as channel:
        answer = channel.unary_unary(EXPORT)(_export_request("tls-grpc", 3), timeout=30)
    assert not ExportTraceServiceResponse.FromString(answer).HasField("partial_success")
    assert _stored_spans(collector, tls_files.ca, "tls-grpc") == 3


def test_otlp_http_over_https_is_stored(collector: Running, tls_files: TlsFiles) -> None:
    response = httpx.post(
        collector.info["otlp_http_url"],
        content=_export_request("tls-http", 2),
        headers={"content-type": "application/x-protobuf"},
        verify=_trusting(tls_files.ca),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert _stored_spans(collector, tls_files.ca, "tls-http") == 2


def test_plaintext_clients_get_nothing_from_the_tls_ports(collector: Running) -> None:
    info = collector.info
    for url in (f"http://{info['http']}/health", f"http://{info['otlp_http']}/v1/traces"):
        with pytest.raises(httpx.HTTPError):
            httpx.post(url, content=b"", timeout=10)
    with grpc.insecure_channel(info["otlp_grpc"]) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(EXPORT)(_export_request("plaintext", 1), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_clients_without_the_ca_refuse_the_certificate(
    collector: Running, tls_files: TlsFiles
) -> None:
    url = f"{collector.info['http_url']}/health"
    for verify in (True, _trusting(tls_files.other_ca)):  # the system's CAs, another CA
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(url, verify=verify, timeout=10)
    assert httpx.get(url, verify=_trusting(tls_files.ca), timeout=10).status_code == 200

    other = grpc.ssl_channel_credentials(root_certificates=tls_files.other_ca.read_bytes())
    with grpc.secure_channel(collector.info["otlp_grpc"], other) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(EXPORT)(_export_request("wrong-ca", 1), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tokentrace_query_verifies_against_the_ca(collector: Running, tls_files: TlsFiles) -> None:
    query = [sys.executable, "-m", "tokentrace", "query", "SELECT 7 AS n", "--format", "csv"]
    query += ["--data-dir", str(collector.data_dir)]
    env = {k: v for k, v in os.environ.items() if k != CA_CERT_ENV}

    def run(*extra: str, **more_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*query, *extra], capture_output=True, text=True, timeout=60, env={**env, **more_env}
        )

    with_flag = run("--ca-cert", str(tls_files.ca))
    assert with_flag.returncode == 0 and with_flag.stdout.splitlines() == ["n", "7"], with_flag
    from_env = run(**{CA_CERT_ENV: str(tls_files.ca)})
    assert from_env.returncode == 0 and from_env.stdout.splitlines() == ["n", "7"], from_env

    # Without the CA (or with the wrong one) it refuses, and says what to give it; it
    # does not fall back to opening the store the collector owns.
    for refused in (run(), run("--ca-cert", str(tls_files.other_ca))):
        assert refused.returncode == 1 and refused.stdout == ""
        assert "does not verify" in refused.stderr and "--ca-cert" in refused.stderr
    unusable = run("--ca-cert", str(tls_files.key))
    assert unusable.returncode == 1
    assert f"CA file {str(tls_files.key)!r} holds no valid PEM certificate" in unusable.stderr


@pytest.mark.parametrize(
    "env", ["OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE"]
)
def test_setup_tracing_exports_to_https_with_the_standard_ca_variable(
    collector: Running, tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch, env: str
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(env, str(tls_files.ca))
    service = f"tls-sdk-{env.lower()}"
    tracing = setup_tracing(
        "router", node_id="tls-node", endpoint=collector.info["otlp_grpc_url"], service_name=service
    )
    assert collector.info["otlp_grpc_url"].startswith("https://")
    for i in range(5):
        tracing.tracer.start_span(f"span-{i}").end()
    tracing.shutdown()
    counts = tracing.exporter_counts()
    assert counts is not None and counts.exported == 5 and counts.dropped == 0
    assert _stored_spans(collector, tls_files.ca, service) == 5


def test_setup_tracing_without_the_ca_exports_nothing(
    collector: Running, tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # seconds, as the SDK reads it
    tracing = setup_tracing(
        "router",
        node_id="tls-node",
        endpoint=collector.info["otlp_grpc_url"],
        service_name="tls-sdk-no-ca",
    )
    tracing.tracer.start_span("unverified").end()
    tracing.shutdown()
    counts = tracing.exporter_counts()
    assert counts is not None and counts.dropped_export_failed == 1 and counts.exported == 0
    assert _stored_spans(collector, tls_files.ca, "tls-sdk-no-ca") == 0


def _collector_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *tls: str | Path
) -> tuple[int, str]:
    code = main(["collector", "--data-dir", str(tmp_path / "data"), *map(str, tls)])
    return code, capsys.readouterr().err


def test_bad_tls_flags_exit_2_naming_the_problem(
    tmp_path: Path, tls_files: TlsFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not PEM\n")
    missing = tmp_path / "missing.pem"
    cert, key = tls_files.cert, tls_files.key
    cases: list[tuple[list[str | Path], str]] = [
        (["--tls-cert", cert], "--tls-cert needs --tls-key"),
        (["--tls-key", key], "--tls-key needs --tls-cert"),
        (["--tls-cert", missing, "--tls-key", key], f"{str(missing)!r} cannot be read"),
        (["--tls-cert", cert, "--tls-key", missing], f"{str(missing)!r} cannot be read"),
        (["--tls-cert", junk, "--tls-key", key], f"{str(junk)!r} holds no valid PEM certificate"),
        (["--tls-cert", key, "--tls-key", key], f"{str(key)!r} holds no valid PEM certificate"),
        (["--tls-cert", cert, "--tls-key", junk], f"{str(junk)!r} holds no valid PEM private key"),
        (
            ["--tls-cert", cert, "--tls-key", tls_files.other_key],
            f"{str(tls_files.other_key)!r} is not the private key of certificate {str(cert)!r}",
        ),
    ]
    for flags, message in cases:
        code, err = _collector_exit(tmp_path, capsys, *flags)
        assert code == 2, (flags, err)
        assert err.startswith("tokentrace collector: ") and message in err, (flags, err)
    assert not (tmp_path / "data" / "collector.json").exists()  # nothing was started


def test_an_encrypted_key_is_refused_without_prompting(
    tmp_path: Path, tls_files: TlsFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(tls_files.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    code, err = _collector_exit(
        tmp_path, capsys, "--tls-cert", tls_files.cert, "--tls-key", encrypted
    )
    assert code == 2 and f"{str(encrypted)!r} is encrypted" in err, err
