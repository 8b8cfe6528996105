"""The client's SPKI walk (``tunnel.common.aio.tls.spki_der``) against ``cryptography``.

The client cuts the public key out of the relay's DER certificate itself so that it need
not import ``cryptography.x509`` (start time, see the module docstring). These tests hold
the walk to ``cryptography``'s answer for every key type a relay may use, to both DER
length forms and to certificates without the optional version field, and check that
anything malformed is a ``ValueError`` (a pin mismatch), never another exception.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from typing import cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.common.aio.tls import check_pin, spki_der, spki_fingerprint
from tunnel.common.errors import FingerprintMismatch

KEYS = {
    "rsa-2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "ed448": ed448.Ed448PrivateKey.generate,
}


def certificate(key: object, long_name: bool = False) -> x509.Certificate:
    """A self-signed certificate; a long subject makes the TBS need 2-byte DER lengths."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay" * (12 if long_name else 1))]
                     + [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "o" * 60)] * long_name)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key())  # type: ignore[attr-defined]
               .serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)))
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) \
        else hashes.SHA256()
    return builder.sign(key, algorithm)  # type: ignore[arg-type]


def expected_spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("kind", sorted(KEYS))
@pytest.mark.parametrize("long_name", [False, True])
def test_walk_matches_cryptography(kind: str, long_name: bool) -> None:
    cert = certificate(KEYS[kind](), long_name)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert spki_der(der) == expected_spki(cert)
    assert spki_fingerprint(der) == "sha256:" + hashlib.sha256(expected_spki(cert)).hexdigest()


def der_element(tag: int, body: bytes) -> bytes:
    """Minimal DER: short length below 128, else the fewest length octets."""
    if len(body) < 0x80:
        return bytes([tag, len(body)]) + body
    octets = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + body


def synthetic(spki: bytes, *, version: bool) -> bytes:
    """A certificate shape with or without the [0] version (v1 certificates omit it)."""
    fields = [der_element(0x02, b"\x01"), der_element(0x30, b""), der_element(0x30, b""),
              der_element(0x30, b""), der_element(0x30, b""), spki]
    if version:
        fields.insert(0, der_element(0xA0, der_element(0x02, b"\x02")))
    tbs = der_element(0x30, b"".join(fields))
    return der_element(0x30, tbs + der_element(0x30, b"") + der_element(0x03, b"\x00"))


@pytest.mark.parametrize("version", [False, True])
def test_walk_with_and_without_version(version: bool) -> None:
    spki = expected_spki(certificate(KEYS["ec-p256"]()))
    assert spki_der(synthetic(spki, version=version)) == spki


@pytest.fixture(scope="module")
def real_der() -> bytes:
    return certificate(KEYS["rsa-2048"]()).public_bytes(serialization.Encoding.DER)


def test_every_truncation_is_a_value_error(real_der: bytes) -> None:
    for cut in range(len(real_der)):
        with pytest.raises(ValueError):
            spki_der(real_der[:cut])


def test_malformed_shapes_are_value_errors(real_der: bytes) -> None:
    spki = expected_spki(certificate(KEYS["ec-p256"]()))
    good = synthetic(spki, version=False)
    cases = {
        "trailing byte": real_der + b"\x00",
        "not a sequence": b"\x31" + real_der[1:],
        "indefinite length": b"\x30\x80" + real_der[2:],
        "five length octets": b"\x30\x85\x00\x00\x00\x01\x00",
        "non-minimal long form": b"\x30\x81\x05" + good[2:7],
        "leading zero length": b"\x30\x82\x00\x05" + good[2:7],
        "serial not an integer": synthetic(spki, version=False).replace(b"\x02\x01\x01",
                                                                         b"\x04\x01\x01", 1),
        "empty": b"",
    }
    for name, der in cases.items():
        with pytest.raises(ValueError):
            spki_der(der)
            pytest.fail(f"accepted: {name}")


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_mutations_only_raise_value_error(real_der: bytes, data: st.DataObject) -> None:
    """Flipped bytes anywhere: the walk returns some bytes or raises ValueError, nothing else."""
    mutated = bytearray(real_der)
    for _ in range(data.draw(st.integers(1, 4))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    try:
        out = spki_der(bytes(mutated))
    except ValueError:
        return
    assert out and out[0] == 0x30 and bytes(out) in bytes(mutated)


class FixedPeer:
    """A TLS object whose peer presented ``der`` (the pin check reads nothing else)."""

    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.der


def test_unreadable_certificate_is_a_mismatch(real_der: bytes) -> None:
    pin = spki_fingerprint(real_der)
    check_pin(cast(ssl.SSLObject, FixedPeer(real_der)), pin)
    with pytest.raises(FingerprintMismatch) as info:
        check_pin(cast(ssl.SSLObject, FixedPeer(real_der[:-1])), pin)
    assert info.value.expected == pin and info.value.actual.startswith("unreadable")
