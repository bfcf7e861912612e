"""Optional TLS on every tokentrace endpoint: the server's certificate and key, and the
CA file clients verify against.

A server (the collector's OTLP/gRPC, OTLP/HTTP and API ports; the router) serves TLS
when given ``--tls-cert`` and ``--tls-key`` (both or neither). The files are checked
when the configuration is validated, so a wrong path, a file that is not PEM or a key
that does not belong to the certificate is refused at startup with the file named,
not at the first handshake.

Clients: ``tokentrace query``/``trace``/``traces`` and ``tokentrace load`` verify an
``https://`` server against ``--ca-cert``, else ``TOKENTRACE_CA_CERT``, else the
system's CAs. The instrumentation's OTLP exporter uses OpenTelemetry's own
``OTEL_EXPORTER_OTLP_CERTIFICATE`` / ``OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE``,
which the SDK's exporter reads itself.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CA_CERT_ENV",
    "CA_CERT_HELP",
    "TLS_CERT_HELP",
    "TLS_KEY_HELP",
    "TlsConfig",
    "certificate_error",
    "client_verify",
    "resolve_ca_cert",
    "tls_from_args",
]

CA_CERT_ENV = "TOKENTRACE_CA_CERT"
TLS_CERT_HELP = "serve TLS with this PEM certificate (chain); needs --tls-key (default: plaintext)"
TLS_KEY_HELP = "the PEM private key of --tls-cert (unencrypted); needs --tls-cert"
CA_CERT_HELP = (
    "verify an https:// server against this PEM CA file (default: $TOKENTRACE_CA_CERT, "
    "else the system's CAs)"
)


def _refuse_password() -> bytes:
    # Without a password callback OpenSSL would prompt on the terminal for an encrypted
    # key, and a server started by a supervisor would hang there.
    raise _EncryptedKey


class _EncryptedKey(Exception):
    pass


@dataclass(frozen=True)
class TlsConfig:
    """A server's certificate (chain) and private key, both PEM files."""

    cert_file: Path
    key_file: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "cert_file", Path(self.cert_file))
        object.__setattr__(self, "key_file", Path(self.key_file))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the file when either cannot be read, the
        certificate file holds no PEM certificate, or the key file holds no unencrypted
        PEM key of that certificate."""
        for what, path in (("certificate", self.cert_file), ("key", self.key_file)):
            try:
                path.read_bytes()
            except OSError as exc:
                raise ValueError(
                    f"TLS {what} file {str(path)!r} cannot be read: {exc.strerror or exc}"
                ) from None
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            # Parses every certificate in the file: a clear "not a certificate" before
            # load_cert_chain's opaque "PEM lib", which cannot say which file it means.
            probe.load_verify_locations(cafile=self.cert_file)
        except ssl.SSLError as exc:
            raise ValueError(
                f"TLS certificate file {str(self.cert_file)!r} holds no valid PEM "
                f"certificate ({exc.reason or exc})"
            ) from None
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            server.load_cert_chain(self.cert_file, self.key_file, password=_refuse_password)
        except _EncryptedKey:
            raise ValueError(
                f"TLS key file {str(self.key_file)!r} is encrypted; give an unencrypted key"
            ) from None
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ValueError(
                    f"TLS key file {str(self.key_file)!r} is not the private key of "
                    f"certificate {str(self.cert_file)!r}"
                ) from None
            detail = f" ({exc.reason})" if exc.reason else ""  # else only OpenSSL's "PEM lib"
            raise ValueError(
                f"TLS key file {str(self.key_file)!r} holds no valid PEM private key{detail}"
            ) from None

    def read_pair(self) -> tuple[bytes, bytes]:
        """``(key PEM, certificate PEM)``, the order ``grpc.ssl_server_credentials``
        takes them in."""
        return self.key_file.read_bytes(), self.cert_file.read_bytes()


def tls_from_args(cert_file: str | Path | None, key_file: str | Path | None) -> TlsConfig | None:
    """The ``--tls-cert`` / ``--tls-key`` pair as a config (not yet validated), None when
    neither is given; ``ValueError`` when only one is."""
    if cert_file is None and key_file is None:
        return None
    if cert_file is None or key_file is None:
        given, missing = "--tls-cert", "--tls-key"
        if cert_file is None:
            given, missing = missing, given
        raise ValueError(f"{given} needs {missing}: TLS takes a certificate and its key")
    return TlsConfig(Path(cert_file), Path(key_file))


def resolve_ca_cert(ca_file: str | Path | None = None) -> Path | None:
    """The CA file a client verifies an ``https://`` server against: the argument, else
    ``TOKENTRACE_CA_CERT``, else None (the system's CAs)."""
    value = ca_file if ca_file is not None else os.environ.get(CA_CERT_ENV)
    return Path(value) if value else None


def client_verify(ca_file: Path | None) -> ssl.SSLContext | bool:
    """httpx's ``verify=`` for ``ca_file``: a context trusting only that CA, or True (the
    system's CAs) without one. ``ValueError`` names the file when it cannot be used."""
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except ssl.SSLError as exc:  # before OSError, its base class
        raise ValueError(
            f"CA file {str(ca_file)!r} holds no valid PEM certificate ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise ValueError(
            f"CA file {str(ca_file)!r} cannot be read: {exc.strerror or exc}"
        ) from None


def certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind a client error (httpx wraps it), or
    None when ``exc`` was something else."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None
