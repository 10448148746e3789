"""TLS setup errors name the file and the fix, not OpenSSL's `[SSL] PEM lib`; a receiver whose
certificate fails verification is refused with the server name that was checked."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orchestrator.transport.endpoint import Endpoint, TlsSetupError, client_context, server_context
from orchestrator.transport.receiver import Receiver
from orchestrator.transport.tcp import ReceiverRefused, TcpOptions

from .conftest import TOKEN, open_sink, ram


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def certificate(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(cert),
    )
    return cert, key


@pytest.fixture
def pki(tmp_path):
    return certificate(tmp_path, "good"), certificate(tmp_path, "other")


def test_server_files_errors_name_the_file_and_the_fix(tmp_path, pki):
    (cert, key), (_, other_key) = pki
    encrypted = tmp_path / "encrypted.key"
    openssl("genrsa", "-aes128", "-passout", "pass:secret", "-out", str(encrypted), "2048")
    missing = tmp_path / "missing.pem"
    cases = [
        (missing, key, rf"cannot read TLS certificate file {missing}: No such file"),
        (cert, missing, rf"cannot read TLS key file {missing}: No such file"),
        (key, key, rf"TLS certificate file {key} holds no PEM certificate"),
        (cert, cert, rf"TLS key file {cert} holds no usable private key"),
        (cert, other_key, rf"TLS key {other_key} does not match the certificate in {cert}"),
        (cert, encrypted, rf"TLS key file {encrypted} is encrypted"),
    ]
    for c, k, message in cases:
        with pytest.raises(TlsSetupError, match=message):
            server_context(c, k)


def test_ca_file_errors_name_the_file(tmp_path, pki):
    (_, key), _ = pki
    missing = tmp_path / "ca.pem"
    with pytest.raises(TlsSetupError, match=rf"cannot read TLS CA file {missing}: No such file"):
        client_context(missing)
    with pytest.raises(TlsSetupError, match=rf"TLS CA file {key} holds no PEM certificate"):
        client_context(key)


@pytest.mark.parametrize(
    "trust, name, why",
    [
        ("good", "elsewhere.example", "not valid for 'elsewhere.example'"),
        ("other", None, "self-signed certificate"),
    ],
)
async def test_verification_failure_names_the_server_name_checked(tmp_path, pki, trust, name, why):
    (cert, key), (other, _) = pki
    async with Receiver(str(ram(tmp_path / "dst")), TOKEN, ssl_context=server_context(cert, key)) as receiver:
        host, port = await receiver.start("127.0.0.1", 0)
        options = TcpOptions(streams=1, ssl=client_context(cert if trust == "good" else other), server_hostname=name)
        checked = name or "127.0.0.1"
        with pytest.raises(
            ReceiverRefused, match=rf"TLS certificate failed verification for server name '{checked}': .*{why}"
        ):
            await open_sink(tmp_path, Endpoint(host, port), options)
