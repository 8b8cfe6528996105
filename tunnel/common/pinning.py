"""The client's side of TLS: its context and the certificate pin check.

Kept apart from :mod:`tunnel.common.tls` (certificate generation, the relay's context) so
that a client never imports ``cryptography.x509``: that import alone cost ~20 ms of a
client's ~130 ms start, and a lab that starts many clients at once (catalogue L-3: 200
programs logging in within 20 s) pays it 200 times. The pin only needs the certificate's
SubjectPublicKeyInfo, which :func:`spki_der` cuts out of the DER bytes with a strict,
position-based walk (no search, so nothing elsewhere in a certificate can pose as its key).

The walk reads a certificate the TLS library has already parsed and whose key has just
signed the handshake, so it needs no tolerance: anything but definite-length DER in the
RFC 5280 order is a ``ValueError``, which :func:`check_pin` reports as a mismatch. The unit
tests check it against ``cryptography``'s re-encoding for RSA, EC and EdDSA keys.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from pathlib import Path

from tunnel.common.errors import FingerprintMismatch, TlsFilesError
from tunnel.common.fingerprint import FINGERPRINT_PREFIX, parse_fingerprint

__all__ = [
    "MIN_TLS_VERSION",
    "check_pin",
    "client_ssl_context",
    "spki_der",
    "spki_fingerprint",
    "ssl_reason",
]

MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2

_SEQUENCE = 0x30
_INTEGER = 0x02
_EXPLICIT_VERSION = 0xA0  # [0] EXPLICIT Version, absent in v1 certificates
#: Length octets beyond this would describe more than 4 GiB: no certificate is that large.
_MAX_LENGTH_OCTETS = 4
#: tbsCertificate fields before subjectPublicKeyInfo (RFC 5280 4.1), after the version:
#: serialNumber, signature, issuer, validity, subject.
_FIELDS_BEFORE_SPKI = (_INTEGER, _SEQUENCE, _SEQUENCE, _SEQUENCE, _SEQUENCE)


def _element(der: bytes, pos: int, limit: int, tag: int) -> tuple[int, int]:
    """The value span ``(start, end)`` of the element at ``pos``, which must carry ``tag``."""
    if pos + 2 > limit or der[pos] != tag:
        raise ValueError(f"expected DER tag {tag:#04x} at offset {pos}")
    first = der[pos + 1]
    start = pos + 2
    if first < 0x80:
        length = first
    else:
        octets = first & 0x7F
        if not 1 <= octets <= _MAX_LENGTH_OCTETS or start + octets > limit:
            raise ValueError(f"bad DER length at offset {pos}")
        length = int.from_bytes(der[start:start + octets], "big")
        if length < 0x80 or der[start] == 0:
            raise ValueError(f"non-minimal DER length at offset {pos}")
        start += octets
    end = start + length
    if end > limit:
        raise ValueError(f"DER element at offset {pos} runs past its container")
    return start, end


def spki_der(cert_der: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of an X.509 certificate, exactly as it appears in it."""
    cert_start, cert_end = _element(cert_der, 0, len(cert_der), _SEQUENCE)
    if cert_end != len(cert_der):
        raise ValueError("bytes after the certificate")
    pos, tbs_end = _element(cert_der, cert_start, cert_end, _SEQUENCE)
    if pos < tbs_end and cert_der[pos] == _EXPLICIT_VERSION:
        pos = _element(cert_der, pos, tbs_end, _EXPLICIT_VERSION)[1]
    for tag in _FIELDS_BEFORE_SPKI:
        pos = _element(cert_der, pos, tbs_end, tag)[1]
    end = _element(cert_der, pos, tbs_end, _SEQUENCE)[1]
    return cert_der[pos:end]


def spki_fingerprint(cert_der: bytes) -> str:
    """``sha256:<hex>`` of the certificate's public key, stable across re-issued certificates."""
    return FINGERPRINT_PREFIX + hashlib.sha256(spki_der(cert_der)).hexdigest()


def ssl_reason(exc: Exception) -> str:
    """A short reason from an ssl/OS error; these carry codes and paths, never file contents."""
    if isinstance(exc, ssl.SSLError):
        if exc.reason:
            return str(exc.reason).replace("_", " ").lower()
        return "not valid PEM (or the key is encrypted)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def client_ssl_context(*, fingerprint: str | None, ca_file: Path | None = None) -> ssl.SSLContext:
    """The client's TLS context.

    With a fingerprint the handshake accepts any certificate and :func:`check_pin` must be
    called on the result: the pin is stronger than CA + hostname checks (it names one key).
    Without one, ordinary CA and hostname verification applies, against ``ca_file`` if given.
    """
    if fingerprint is not None and ca_file is not None:
        raise ValueError("give either a pinned fingerprint or a CA file, not both")
    if fingerprint is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except (ssl.SSLError, OSError) as exc:
            paths = [ca_file] if ca_file is not None else []
            raise TlsFilesError(paths, f"cannot load CA file: {ssl_reason(exc)}") from None
    context.minimum_version = MIN_TLS_VERSION
    return context


def check_pin(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: str) -> None:
    """Raise :class:`FingerprintMismatch` unless the peer's public key is the pinned one."""
    expected = parse_fingerprint(expected, "pinned fingerprint")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        actual = "none (no certificate presented)"
    else:
        try:
            actual = spki_fingerprint(der)
        except ValueError as exc:
            actual = f"unreadable ({exc})"
    if not hmac.compare_digest(actual.encode("ascii"), expected.encode("ascii")):
        raise FingerprintMismatch(expected, actual)
