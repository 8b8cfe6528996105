"""TLS for the link: a self-signed relay certificate, pinned by the client.

Most relays run on a bare VPS without a domain, so a CA-signed certificate is not an option
and an unverified connection would hand the token to any man in the middle. Instead the
relay generates one self-signed certificate on first start and keeps it; ``add-client``
prints its fingerprint, and the client accepts exactly that public key (pinning replaces CA
and hostname verification). Relays that do have a CA-signed certificate get ordinary
verification when no fingerprint is configured.

The fingerprint covers the SubjectPublicKeyInfo, not the whole certificate, so re-issuing
the certificate for the same key (e.g. to add a host name) does not break pinned clients.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import secrets
import ssl
import stat
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunnel.common.aio.tls import (
    MIN_TLS_VERSION,
    check_pin,
    client_ssl_context,
    spki_fingerprint,
    ssl_reason,
)
from tunnel.common.config.base import FINGERPRINT_PREFIX, parse_fingerprint
from tunnel.common.config.statefiles import (
    create_private_file,
    ensure_private_dir,
    open_private_file,
    regular_file_exists,
)
from tunnel.common.errors import ConfigError, TlsFilesError

__all__ = [
    "CERT_FILE",
    "CERT_VALIDITY_DAYS",
    "FINGERPRINT_PREFIX",
    "KEY_FILE",
    "MIN_TLS_VERSION",
    "TlsFilesError",
    "cert_file_fingerprint",
    "check_pin",
    "check_private_file",
    "client_ssl_context",
    "ensure_self_signed",
    "generate_self_signed",
    "parse_fingerprint",
    "server_ssl_context",
    "spki_fingerprint",
]

CERT_VALIDITY_DAYS = 3650
KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"

DEFAULT_SAN_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Always in the SAN, so local tests and SSH port forwards verify with ``ca_file``."""
FALLBACK_COMMON_NAME = "tunnel-relay"
"""Used when no host is given or the first one is too long for a CN (64 characters)."""
MAX_COMMON_NAME_LENGTH = 64
BACKDATE = timedelta(hours=1)
"""``notBefore`` lies in the past so a client whose clock runs slightly behind still accepts."""

"""Longest accepted spelling (prefix + colon-separated pairs); longer input is never parsed."""
_DNS_NAME = re.compile(
    r"(?:\*\.)?[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)
_MAX_DNS_NAME_LENGTH = 253
_HOSTS_SOURCE = "self-signed certificate"
_TEMP_SUFFIX_BYTES = 4
_NO_PASSWORD = b""

log = logging.getLogger("tunnel.tls")


# ----------------------------------------------------------------------------- fingerprints


def cert_file_fingerprint(cert_path: Path) -> str:
    """Fingerprint of the first certificate in a PEM file (what ``add-client`` prints)."""
    try:
        pem = cert_path.read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
    except OSError as exc:
        raise TlsFilesError([cert_path], f"cannot read certificate: {exc.strerror}") from None
    except ValueError:
        raise TlsFilesError([cert_path], "not a PEM certificate") from None
    return spki_fingerprint(cert.public_bytes(serialization.Encoding.DER))


# ----------------------------------------------------------------------------- generation


def _general_name(host: str) -> x509.GeneralName:
    """An IP address SAN when the host parses as one (clients match IPs only against those)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return x509.IPAddress(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if len(host) > _MAX_DNS_NAME_LENGTH or not _DNS_NAME.fullmatch(host):
        raise ConfigError(_HOSTS_SOURCE, "hosts",
                          f"{host[:80]!r} is neither a DNS name nor an IP address")
    return x509.DNSName(host)


def _subject_alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in (*hosts, *DEFAULT_SAN_HOSTS):
        name = _general_name(host.strip())
        if name not in names:
            names.append(name)
    return names


def _common_name(hosts: Sequence[str]) -> str:
    first = hosts[0].strip() if hosts else ""
    if not first or len(first) > MAX_COMMON_NAME_LENGTH:
        return FALLBACK_COMMON_NAME
    return first


def _build_certificate(key: ec.EllipticCurvePrivateKey, hosts: Sequence[str]) -> x509.Certificate:
    """A leaf that is its own issuer; SKI/AKI keep strict verifiers (Python 3.13+) happy."""
    hosts = [h for h in hosts if h.strip()]
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _common_name(hosts))])
    public = key.public_key()
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                       critical=False)
        .sign(key, hashes.SHA256())
    )


def _temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{secrets.token_hex(_TEMP_SUFFIX_BYTES)}")


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 from the first instant (no chmod window), and fsync it."""
    with os.fdopen(create_private_file(path), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _publish_no_clobber(temp: Path, final: Path) -> None:
    """Move ``temp`` to ``final`` atomically, failing if ``final`` appeared meanwhile.

    A hard link is atomic and refuses to overwrite, so two relays started at once cannot
    swap each other's key; filesystems without hard links fall back to a checked replace.
    """
    try:
        os.link(temp, final)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(final):
            raise FileExistsError(str(final)) from None
        os.replace(temp, final)
        return
    temp.unlink()


def _fsync_dir(directory: Path) -> None:
    """Make the renames durable; best effort, some platforms cannot open directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def generate_self_signed(tls_dir: Path, hosts: Sequence[str]) -> tuple[Path, Path]:
    """Create a new ECDSA P-256 key and self-signed certificate in ``tls_dir``.

    Both files are written under temporary names and renamed into place, so a crash leaves
    at worst stray temp files, never a truncated key. Refuses to replace an existing key:
    clients pin it, and a silently new key would lock all of them out.
    """
    tls_dir = Path(tls_dir)
    key_path, cert_path = tls_dir / KEY_FILE, tls_dir / CERT_FILE
    ensure_private_dir(tls_dir)
    if regular_file_exists(key_path):  # a link or directory there is refused by name
        raise FileExistsError(f"{key_path} already exists; refusing to replace a pinned key")
    regular_file_exists(cert_path)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _build_certificate(key, hosts)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    key_temp, cert_temp = _temp_path(key_path), _temp_path(cert_path)
    try:
        _write_new_file(key_temp, key_pem)
        _write_new_file(cert_temp, cert.public_bytes(serialization.Encoding.PEM))
        _publish_no_clobber(key_temp, key_path)
        try:
            os.replace(cert_temp, cert_path)
        except OSError:
            key_path.unlink()
            raise
    finally:
        for temp in (key_temp, cert_temp):
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
    _fsync_dir(tls_dir)
    return key_path, cert_path


def ensure_self_signed(tls_dir: Path, hosts: Sequence[str]) -> tuple[Path, Path, bool]:
    """Generate the relay's key once and reuse it on every later start.

    Returns ``(key, cert, created)``. One file without the other means someone deleted or
    moved a file; guessing (regenerating) would change the pinned key, so this refuses. Both
    are state files (0600 in a 0700 directory, never a link): a link or directory in either
    place is refused by name, and files kept from a looser setup are tightened.
    """
    tls_dir = Path(tls_dir)
    key_path, cert_path = tls_dir / KEY_FILE, tls_dir / CERT_FILE
    ensure_private_dir(tls_dir)
    key_exists, cert_exists = regular_file_exists(key_path), regular_file_exists(cert_path)
    if key_exists and cert_exists:
        for path in (key_path, cert_path):
            os.close(open_private_file(path, create=False))
        return key_path, cert_path, False
    if key_exists != cert_exists:
        present, missing = (key_path, cert_path) if key_exists else (cert_path, key_path)
        raise TlsFilesError(
            [present, missing],
            f"{missing.name} is missing but {present.name} exists; restore it, or delete both "
            "to generate a new certificate (every client must then be given the new fingerprint)",
        )
    key_path, cert_path = generate_self_signed(tls_dir, hosts)
    return key_path, cert_path, True


def check_private_file(path: Path, log: logging.Logger) -> None:
    """Warn when a secret-holding file is readable by other users, who could then use it."""
    if os.name == "nt":  # POSIX mode bits mean nothing there
        return
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s is readable by group or others (mode %03o); it holds a secret, "
                    "run: chmod 600 %s", path, stat.S_IMODE(mode), path)


# ----------------------------------------------------------------------------- contexts


def server_ssl_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """The relay's TLS context; TLS 1.0/1.1 are refused."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_TLS_VERSION
    try:
        # An empty password makes an encrypted key fail fast instead of OpenSSL prompting
        # on the terminal, which would hang a relay started by systemd.
        context.load_cert_chain(certfile=cert_path, keyfile=key_path, password=_NO_PASSWORD)
    except (ssl.SSLError, OSError) as exc:
        raise TlsFilesError([cert_path, key_path],
                            f"cannot load certificate and key: {ssl_reason(exc)}") from None
    return context
