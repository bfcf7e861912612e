"""``tokentrace router --tls-cert --tls-key``: a real router process serves HTTPS only,
and ``tokentrace load`` streams completions through it when it trusts the CA
(``--ca-cert`` or ``TOKENTRACE_CA_CERT``) and refuses the certificate otherwise. The
workers behind it are the stubs of test_router_flow."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from test_router_flow import Served, StubWorker
from tls_certs import TlsFiles

from tokentrace.cli import main
from tokentrace.runtime.tls import CA_CERT_ENV
from tokentrace.serving.procs import free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def router_url(tls_files: TlsFiles) -> Iterator[str]:
    workers = [Served(StubWorker("prefill").app()), Served(StubWorker("decode").app())]
    port = free_port()
    router = subprocess.Popen(
        [sys.executable, "-m", "tokentrace", "router"]
        + ["--prefill", workers[0].url, "--decode", workers[1].url, "--port", str(port)]
        + ["--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(tls_files.ca))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", verify=trust, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if router.poll() is not None or time.monotonic() > deadline:
                router.kill()
                pytest.fail(f"router did not serve HTTPS: {router.communicate()[1]}")
            time.sleep(0.1)
        yield url
    finally:
        router.send_signal(signal.SIGTERM)
        router.wait(timeout=30)
        for worker in workers:
            worker.stop()


def _load(url: str, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "tokentrace", "load", "--url", url, "--no-progress"]
    argv += ["--requests", "3", "--concurrency", "1", "--input-len", "8", "--output-len", "4"]
    base = {k: v for k, v in os.environ.items() if k != CA_CERT_ENV}
    return subprocess.run(
        [*argv, *extra], capture_output=True, text=True, timeout=90, env={**base, **env}
    )


def test_load_streams_through_the_https_router_with_the_ca(
    router_url: str, tls_files: TlsFiles
) -> None:
    with_flag = _load(router_url, "--ca-cert", str(tls_files.ca))
    assert with_flag.returncode == 0, with_flag.stderr
    assert "successful requests: 3" in with_flag.stdout and "failed requests: 0" in with_flag.stdout
    from_env = _load(router_url, **{CA_CERT_ENV: str(tls_files.ca)})
    assert from_env.returncode == 0, from_env.stderr


def test_load_refuses_the_router_certificate_without_the_ca(
    router_url: str, tls_files: TlsFiles
) -> None:
    for refused in (_load(router_url), _load(router_url, "--ca-cert", str(tls_files.other_ca))):
        assert refused.returncode == 2, refused.stdout
        assert "does not verify" in refused.stderr and "--ca-cert" in refused.stderr


def test_the_router_speaks_no_plaintext(router_url: str) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(router_url.replace("https://", "http://") + "/health", timeout=10)


def test_router_refuses_half_a_tls_pair(
    tls_files: TlsFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    workers = ["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"]
    assert main(["router", *workers, "--tls-key", str(tls_files.key)]) == 2
    assert "tokentrace router: --tls-key needs --tls-cert" in capsys.readouterr().err
    bad_key = ["--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.other_key)]
    assert main(["router", *workers, *bad_key]) == 2
    assert "is not the private key of certificate" in capsys.readouterr().err
