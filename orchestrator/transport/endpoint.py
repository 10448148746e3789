"""Where a receiver listens and how the stream is encrypted: address parsing, TLS contexts."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from orchestrator.transport.errors import TransportError


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """'HOST:PORT' or '[V6ADDR]:PORT'."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise AddressError(f"bad address {text!r}: use HOST:PORT")
    return Endpoint(host, int(port))


class AddressError(TransportError, ValueError):
    """An address that is not HOST:PORT."""


class TlsSetupError(TransportError, ValueError):
    """A TLS file cannot be used; the message names the file and what to do about it."""


def _readable(path: Path, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TlsSetupError(f"cannot read TLS {what} file {path}: {exc.strerror}") from None


def _certificates(ctx: ssl.SSLContext, path: Path, what: str) -> None:
    """Load `path` as trusted certificates (OpenSSL's own PEM check), naming the file if it
    holds none."""
    _readable(path, what)
    try:
        ctx.load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        raise TlsSetupError(
            f"TLS {what} file {path} holds no PEM certificate ({exc.reason}): give a '-----BEGIN CERTIFICATE-----' file"
        ) from None


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS for the receiver (1.2 or newer). The certificate is checked on its own first, so
    OpenSSL's one message for every bad file ("PEM lib") becomes which file and why."""
    _certificates(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert, "certificate")
    _readable(key, "key")

    def no_password() -> str:
        raise TlsSetupError(f"TLS key file {key} is encrypted: give an unencrypted key (openssl pkey -in KEY -out NEW)")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsSetupError(
                f"TLS key {key} does not match the certificate in {cert}: give the key the certificate was made for"
            ) from None
        raise TlsSetupError(
            f"TLS key file {key} holds no usable private key ({exc.reason or exc}): give the certificate's PEM key"
        ) from None
    return ctx


def client_context(ca: Path) -> ssl.SSLContext:
    """TLS for the sender: the receiver's certificate must chain to `ca` (and only to it: no
    system CAs) and name the host."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _certificates(ctx, ca, "CA")
    return ctx
