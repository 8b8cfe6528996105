"""A relay certificate from a CA (`tls: {cert, key}`) is verified normally, without a pin.

The test plays the CA itself (``cryptography``): the relay serves a certificate the CA
signed for 127.0.0.1, the client trusts that CA through ``--ca-file``. Without the CA file
the same client refuses the relay (exit 3) before sending anything.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.e2e.harness import (
    ALPHA_TOKEN,
    CLIENT_MODULE,
    SERVER_MODULE,
    free_ports,
    server_config,
    start_client,
    start_proc,
    wait_tunnel,
    write_config,
)
from tests.e2e.services import EchoService, echo_check

MIB = 1024 * 1024


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server cert.pem, server key.pem) with the server cert valid for 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("test CA")).issuer_name(_name("test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = (directory / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


async def test_ca_signed_relay_certificate_is_verified_without_a_pin(tmp_path: Path) -> None:
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    config = server_config(tmp_path, [port], tls={"cert": str(cert), "key": str(key)})
    server = await start_proc("tunnel-server", SERVER_MODULE,
                              ["--config", str(write_config(tmp_path, config))])
    url = (await server.wait_for_line(r"listening on (?P<url>wss://\S+)$"))["url"]

    refused = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"],
                                 name="no-ca-file")
    assert await refused.wait_exit() == 3
    assert "not trusted" in refused.stderr and "--ca-file" in refused.stderr

    client = await start_proc("tunnel-client", CLIENT_MODULE, [
        "--server", url, "--token", ALPHA_TOKEN, "--ca-file", str(ca),
        "--expose", f"{echo.target}:fixed-{port}"])
    assert await wait_tunnel(client, echo.target, mode="fixed") == port
    await echo_check(port, MIB)


async def test_unreachable_relay_is_one_clear_line_and_the_client_keeps_trying(
        tmp_path: Path) -> None:
    (closed,) = free_ports(1)  # nothing listens there
    client = await start_client(f"ws://127.0.0.1:{closed}", ALPHA_TOKEN, ["127.0.0.1:9"])
    await client.wait_for_line(r"cannot reach the relay at ws://127\.0\.0\.1:\d+/tunnel: "
                               r"connection refused", timeout=10, stream="stderr")
    await client.wait_for_line(r"reconnecting in", timeout=10, stream="stderr")
    assert client.returncode is None  # network trouble never ends the client
