"""The TLS settings every tokentrace server and client shares: the flag pair, the CA
file a client trusts, and the errors that name the file at fault. (Certificates made
at test time, and real servers, are in tests/integration/collector/test_collector_tls.py.)"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from tokentrace.runtime.tls import (
    CA_CERT_ENV,
    TlsConfig,
    certificate_error,
    client_verify,
    resolve_ca_cert,
    tls_from_args,
)


def test_cert_and_key_come_together_or_not_at_all() -> None:
    assert tls_from_args(None, None) is None
    assert tls_from_args("c.pem", "k.pem") == TlsConfig(Path("c.pem"), Path("k.pem"))
    with pytest.raises(ValueError, match="--tls-cert needs --tls-key"):
        tls_from_args("c.pem", None)
    with pytest.raises(ValueError, match="--tls-key needs --tls-cert"):
        tls_from_args(None, "k.pem")


def test_unreadable_or_non_pem_files_are_named(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    missing = tmp_path / "missing.pem"
    cases = [
        (TlsConfig(missing, junk), f"TLS certificate file {str(missing)!r} cannot be read"),
        (TlsConfig(junk, missing), f"TLS key file {str(missing)!r} cannot be read"),
        (TlsConfig(tmp_path, junk), f"TLS certificate file {str(tmp_path)!r} cannot be read"),
        (TlsConfig(junk, junk), f"TLS certificate file {str(junk)!r} holds no valid PEM"),
    ]
    for config, message in cases:
        with pytest.raises(ValueError) as refused:
            config.validate()
        assert message in str(refused.value)


def test_the_ca_file_comes_from_the_argument_then_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(CA_CERT_ENV, raising=False)
    assert resolve_ca_cert() is None and client_verify(None) is True
    monkeypatch.setenv(CA_CERT_ENV, "/env/ca.pem")
    assert resolve_ca_cert() == Path("/env/ca.pem")
    assert resolve_ca_cert(tmp_path / "arg.pem") == tmp_path / "arg.pem"
    monkeypatch.setenv(CA_CERT_ENV, "")
    assert resolve_ca_cert() is None


def test_an_unusable_ca_file_is_named(tmp_path: Path) -> None:
    missing, junk = tmp_path / "missing.pem", tmp_path / "junk.pem"
    junk.write_text("no certificate here\n")
    with pytest.raises(ValueError, match=f"CA file '{missing}' cannot be read"):
        client_verify(missing)
    with pytest.raises(ValueError, match=f"CA file '{junk}' holds no valid PEM certificate"):
        client_verify(junk)


def test_certificate_error_finds_the_verification_failure_behind_a_wrapper() -> None:
    failure = ssl.SSLCertVerificationError(1, "certificate verify failed")
    try:
        try:
            raise failure
        except ssl.SSLError as exc:
            raise ConnectionError("connect failed") from exc
    except ConnectionError as wrapped:
        assert certificate_error(wrapped) is failure
    assert certificate_error(ConnectionError("refused")) is None
    assert certificate_error(ssl.SSLError(1, "handshake")) is None
