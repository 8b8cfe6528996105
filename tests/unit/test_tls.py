"""Self-signed relay certificate, SPKI pinning and the TLS contexts (in memory, no network)."""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import ssl
import stat
from pathlib import Path
from typing import cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tunnel.common.errors import ConfigError, FingerprintMismatch, TunnelError
from tunnel.server.tls import (
    CERT_FILE,
    CERT_VALIDITY_DAYS,
    FINGERPRINT_PREFIX,
    KEY_FILE,
    TlsFilesError,
    cert_file_fingerprint,
    check_pin,
    check_private_file,
    client_ssl_context,
    ensure_self_signed,
    generate_self_signed,
    parse_fingerprint,
    server_ssl_context,
    spki_fingerprint,
)

HOSTS = ("vps.example.com", "203.0.113.7")
MAX_HANDSHAKE_ROUNDS = 20
HEX64 = "0123456789abcdef" * 4


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def independent_fingerprint(cert_path: Path) -> str:
    spki = load_cert(cert_path).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()


@pytest.fixture
def relay(tmp_path: Path) -> tuple[Path, Path]:
    return generate_self_signed(tmp_path / "tls", HOSTS)


@pytest.fixture
def other_relay(tmp_path: Path) -> tuple[Path, Path]:
    return generate_self_signed(tmp_path / "other", HOSTS)


class Handshake:
    """A client and a server TLS object joined by MemoryBIOs: a real handshake, no sockets."""

    def __init__(self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                 server_hostname: str | None) -> None:
        self.c_in, self.c_out, self.s_in, self.s_out = (ssl.MemoryBIO() for _ in range(4))
        self.client = client_ctx.wrap_bio(self.c_in, self.c_out, server_hostname=server_hostname)
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)

    def run(self) -> None:
        done = {"client": False, "server": False}
        for _ in range(MAX_HANDSHAKE_ROUNDS):
            for role, obj in (("client", self.client), ("server", self.server)):
                if not done[role]:
                    try:
                        obj.do_handshake()
                        done[role] = True
                    except ssl.SSLWantReadError:
                        pass
                self.s_in.write(self.c_out.read())
                self.c_in.write(self.s_out.read())
            if all(done.values()):
                return
        raise AssertionError("handshake did not finish")


def handshake(relay: tuple[Path, Path], client_ctx: ssl.SSLContext,
              server_hostname: str | None = "vps.example.com") -> Handshake:
    key, cert = relay
    hs = Handshake(server_ssl_context(cert, key), client_ctx, server_hostname)
    hs.run()
    return hs


# ----------------------------------------------------------------------------- generation


def test_generate_writes_private_key_and_dir_privately(relay: tuple[Path, Path]) -> None:
    key, cert = relay
    assert key.name == KEY_FILE and cert.name == CERT_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(cert.stat().st_mode) == 0o600  # a state file like any other
    assert sorted(p.name for p in key.parent.iterdir()) == [CERT_FILE, KEY_FILE]  # no temp files
    assert b"ENCRYPTED" not in key.read_bytes()
    assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8


def test_key_mode_is_private_from_creation(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kw: object) -> int:
        created.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", spy)
    generate_self_signed(tmp_path / "tls", HOSTS)
    key_opens = [c for c in created if KEY_FILE in Path(c[0]).name]
    assert key_opens, "the key must be created with os.open"
    for _, flags, mode in key_opens:
        assert flags & os.O_CREAT and flags & os.O_EXCL and flags & os.O_NOFOLLOW
        assert mode == 0o600


def test_certificate_contents(relay: tuple[Path, Path]) -> None:
    key, cert_path = relay
    cert = load_cert(cert_path)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert cn == "vps.example.com"
    assert cert.issuer == cert.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"vps.example.com", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("203.0.113.7"), ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1")}
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.value.ca is False and basic.critical
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs(lifetime.total_seconds() - (CERT_VALIDITY_DAYS * 86400 + 3600)) < 60
    key_obj = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert isinstance(key_obj, ec.EllipticCurvePrivateKey)


def test_serials_are_random(relay: tuple[Path, Path], other_relay: tuple[Path, Path]) -> None:
    assert load_cert(relay[1]).serial_number != load_cert(other_relay[1]).serial_number


def test_no_hosts_still_yields_a_usable_cert(tmp_path: Path) -> None:
    _, cert = generate_self_signed(tmp_path / "tls", [])
    san = load_cert(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "localhost" in san.value.get_values_for_type(x509.DNSName)


def test_bad_host_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a DNS name nor an IP address"):
        generate_self_signed(tmp_path / "tls", ["not a host"])
    assert not (tmp_path / "tls" / KEY_FILE).exists()


def test_generate_refuses_to_replace_a_key(relay: tuple[Path, Path]) -> None:
    key, _ = relay
    before = key.read_bytes()
    with pytest.raises(FileExistsError):
        generate_self_signed(key.parent, HOSTS)
    assert key.read_bytes() == before


def test_ensure_generates_once_then_reuses(tmp_path: Path) -> None:
    tls_dir = tmp_path / "state" / "tls"
    key, cert, created = ensure_self_signed(tls_dir, HOSTS)
    assert created
    first = cert_file_fingerprint(cert)
    snapshot = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (key, cert)}
    key2, cert2, created2 = ensure_self_signed(tls_dir, ["other.example.org"])
    assert (key2, cert2, created2) == (key, cert, False)
    assert cert_file_fingerprint(cert2) == first
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (key, cert)} == snapshot


@pytest.mark.parametrize("missing", [CERT_FILE, KEY_FILE])
def test_half_written_state_is_refused(relay: tuple[Path, Path], missing: str) -> None:
    key, _ = relay
    (key.parent / missing).unlink()
    with pytest.raises(TlsFilesError) as info:
        ensure_self_signed(key.parent, HOSTS)
    assert isinstance(info.value, TunnelError)
    assert str(key.parent / missing) in str(info.value)
    assert not (key.parent / missing).exists()  # nothing was regenerated


# ----------------------------------------------------------------------------- fingerprints


def test_fingerprint_is_sha256_of_spki(relay: tuple[Path, Path]) -> None:
    _, cert = relay
    der = load_cert(cert).public_bytes(serialization.Encoding.DER)
    expected = independent_fingerprint(cert)
    assert spki_fingerprint(der) == expected == cert_file_fingerprint(cert)
    assert expected.startswith(FINGERPRINT_PREFIX) and len(expected) == len("sha256:") + 64


def test_fingerprints_differ_per_key(relay: tuple[Path, Path],
                                     other_relay: tuple[Path, Path]) -> None:
    assert cert_file_fingerprint(relay[1]) != cert_file_fingerprint(other_relay[1])


def test_cert_file_fingerprint_errors_name_the_file(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("hello")
    with pytest.raises(TlsFilesError, match=r"bogus\.pem"):
        cert_file_fingerprint(bogus)
    with pytest.raises(TlsFilesError, match=r"missing\.pem"):
        cert_file_fingerprint(tmp_path / "missing.pem")


@pytest.mark.parametrize("text", [
    "sha256:" + HEX64,
    HEX64,
    HEX64.upper(),
    "SHA256:" + HEX64.upper(),
    "sha256:" + ":".join(HEX64[i:i + 2] for i in range(0, 64, 2)),
    ":".join(HEX64[i:i + 2] for i in range(0, 64, 2)).upper(),
    "  sha256:" + HEX64 + "\n",
])
def test_parse_fingerprint_normalizes(text: str) -> None:
    assert parse_fingerprint(text, "settings.yaml") == "sha256:" + HEX64


@pytest.mark.parametrize("text", [
    "",
    "sha256:",
    "sha256:" + HEX64[:-1],
    "sha256:" + HEX64 + "0",
    "sha256:" + "g" * 64,
    "sha1:" + HEX64,
    "md5:" + HEX64,
    "sha256:" + ":".join(HEX64[i:i + 2] for i in range(0, 64, 2)) + ":",
    "sha256:" + HEX64[:32] + ":" + HEX64[32:],
    "sha256: " + HEX64,
    "x" * 10_000,
])
def test_parse_fingerprint_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_fingerprint(text, "settings.yaml", "relay.fingerprint")
    message = str(info.value)
    assert "malformed fingerprint" in message and "relay.fingerprint" in message
    assert len(message) < 200


# ----------------------------------------------------------------------------- handshakes


def test_pinned_handshake_and_check_pin(relay: tuple[Path, Path],
                                        other_relay: tuple[Path, Path]) -> None:
    pin = cert_file_fingerprint(relay[1])
    hs = handshake(relay, client_ssl_context(fingerprint=pin), server_hostname="anything.invalid")
    check_pin(hs.client, pin)
    check_pin(hs.client, pin.upper().replace("SHA256:", ""))  # any accepted spelling works
    wrong = cert_file_fingerprint(other_relay[1])
    with pytest.raises(FingerprintMismatch) as info:
        check_pin(hs.client, wrong)
    assert info.value.expected == wrong and info.value.actual == pin


class NoPeerCert:
    """Stands in for a TLS object whose peer sent no certificate (e.g. an anonymous suite)."""

    def getpeercert(self, binary_form: bool = False) -> None:
        return None


def test_check_pin_without_peer_cert(relay: tuple[Path, Path]) -> None:
    pin = cert_file_fingerprint(relay[1])
    with pytest.raises(FingerprintMismatch) as info:
        check_pin(cast(ssl.SSLObject, NoPeerCert()), pin)
    assert info.value.expected == pin and "none" in info.value.actual


def test_ca_context_rejects_self_signed_by_default(relay: tuple[Path, Path]) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(relay, client_ssl_context(fingerprint=None))


@pytest.mark.parametrize("hostname", ["vps.example.com", "203.0.113.7", "localhost",
                                      "127.0.0.1", "::1"])
def test_ca_context_accepts_cert_as_ca_for_san_hosts(relay: tuple[Path, Path],
                                                     hostname: str) -> None:
    ctx = client_ssl_context(fingerprint=None, ca_file=relay[1])
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    handshake(relay, ctx, server_hostname=hostname)


def test_ca_context_checks_the_hostname(relay: tuple[Path, Path]) -> None:
    ctx = client_ssl_context(fingerprint=None, ca_file=relay[1])
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(relay, ctx, server_hostname="evil.example.net")


def test_minimum_tls_version(relay: tuple[Path, Path]) -> None:
    key, cert = relay
    contexts = [server_ssl_context(cert, key),
                client_ssl_context(fingerprint=cert_file_fingerprint(cert)),
                client_ssl_context(fingerprint=None),
                client_ssl_context(fingerprint=None, ca_file=cert)]
    for ctx in contexts:
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_fingerprint_and_ca_file_are_exclusive(relay: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError):
        client_ssl_context(fingerprint="sha256:" + HEX64, ca_file=relay[1])


def test_server_context_errors_name_files_not_contents(relay: tuple[Path, Path],
                                                       other_relay: tuple[Path, Path]) -> None:
    key, cert = relay
    key_text = key.read_text()
    with pytest.raises(TlsFilesError) as info:
        server_ssl_context(cert, other_relay[0])  # key does not match the cert
    assert str(cert) in str(info.value) and str(other_relay[0]) in str(info.value)
    assert key_text not in str(info.value)
    with pytest.raises(TlsFilesError, match=r"nope\.pem"):
        server_ssl_context(cert, key.parent / "nope.pem")


def test_bad_ca_file_is_tls_files_error(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a cert")
    with pytest.raises(TlsFilesError, match=r"ca\.pem"):
        client_ssl_context(fingerprint=None, ca_file=bogus)


# ----------------------------------------------------------------------------- permissions


def test_check_private_file_warns_when_readable(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.tls")
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="test.tls"):
        check_private_file(secret, logger)
    assert not caplog.records
    secret.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="test.tls"):
        check_private_file(secret, logger)
    assert len(caplog.records) == 1
    assert str(secret) in caplog.text and "chmod 600" in caplog.text


def test_check_private_file_ignores_missing(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    check_private_file(tmp_path / "missing", logging.getLogger("test.tls"))
    assert not caplog.records


def test_encrypted_key_fails_fast_without_prompting(relay: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    key, cert = relay
    loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(loaded.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(TlsFilesError, match="encrypted"):
        server_ssl_context(cert, encrypted)
