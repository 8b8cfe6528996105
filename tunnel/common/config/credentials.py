"""Ed25519 client credentials and the one-line join string.

The relay stores only each client's *public* key, so a leaked relay config (or backup of it)
cannot be used to impersonate a client; the private key lives only on the client. Keys are
written as ``ed25519:`` + unpadded base64url of the 32 raw bytes: short enough to paste,
with no characters a shell or YAML would mangle.

The join string bundles everything a client needs (relay URL, certificate pin, its name and
its private key) so setting up a client is one copy-paste from ``tunnel-server add-client``.
It holds a private key, so it is treated as a secret everywhere: never echoed in errors and
hidden in reprs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tunnel.common.config.base import parse_fingerprint
from tunnel.common.errors import ConfigError
from tunnel.common.proto.secret import Secret

__all__ = [
    "JOIN_PREFIX",
    "JOIN_SOURCE",
    "JOIN_VERSION",
    "KEY_ID_BYTES",
    "KEY_PREFIX",
    "MAX_JOIN_LENGTH",
    "MAX_SHOWN_NAME",
    "JoinInfo",
    "decode_join",
    "encode_join",
    "generate_keypair",
    "key_id",
    "parse_private_key",
    "parse_public_key",
    "public_key_of",
    "shown_name",
    "sign",
    "verify",
]


KEY_PREFIX = "ed25519:"
JOIN_PREFIX = "tunnel1_"
JOIN_VERSION = 1
MAX_JOIN_LENGTH = 2048
JOIN_SOURCE = "join string"
KEY_ID_BYTES = 16
"""128 bits: collisions between a relay's clients are out of the question, yet the id is short."""
RAW_KEY_BYTES = 32
SIGNATURE_BYTES = 64
URL_SCHEMES = ("ws", "wss")
JOIN_HINT = "copy the whole string printed by `tunnel-server add-client`"
# Kept equal to config.CLIENT_NAME_PATTERN; not imported so config may import this module.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_ENCODED_KEY_LENGTH = len(KEY_PREFIX) + 43
_JOIN_FIELDS = frozenset({"v", "u", "f", "n", "k"})
_PUBLIC_FORMAT = "expected ed25519: followed by 43 base64url characters (a public key)"
_PRIVATE_FORMAT = "malformed private key: expected ed25519: followed by 43 base64url characters"


# ----------------------------------------------------------------------------- encoding


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes | None:
    """Strict unpadded base64url: ``None`` unless ``text`` is the one canonical encoding.

    The stdlib decoder skips foreign characters and ignores stray trailing bits; either would
    let two spellings denote the same key, which a "same key?" string comparison would miss.
    """
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if _b64encode(raw) == text else None


def _decode_key(text: object) -> bytes | None:
    """The 32 raw bytes of an ``ed25519:`` key string, or ``None`` if it is not one."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if len(text) != _ENCODED_KEY_LENGTH or not text.lower().startswith(KEY_PREFIX):
        return None
    raw = _b64decode(text[len(KEY_PREFIX):])
    return raw if raw is not None and len(raw) == RAW_KEY_BYTES else None


def _encode_key(raw: bytes) -> str:
    return KEY_PREFIX + _b64encode(raw)


def _load_private(private: Secret) -> Ed25519PrivateKey:
    seed = _decode_key(private.reveal())
    if seed is None:
        raise ValueError(_PRIVATE_FORMAT)
    return Ed25519PrivateKey.from_private_bytes(seed)


def _load_public(public: str) -> Ed25519PublicKey:
    raw = _decode_key(public)
    if raw is None:
        raise ValueError(f"malformed public key: {_PUBLIC_FORMAT}")
    return Ed25519PublicKey.from_public_bytes(raw)


def _public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# ----------------------------------------------------------------------------- keys


def generate_keypair() -> tuple[Secret, str]:
    """A fresh ``(private, public)`` pair; the private half is wrapped so it cannot leak."""
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    return Secret(_encode_key(seed)), _encode_key(_public_raw(key.public_key()))


def public_key_of(private: Secret) -> str:
    """The public key for a private one, e.g. to show a client which entry the relay needs."""
    return _encode_key(_public_raw(_load_private(private).public_key()))


def parse_public_key(text: object, source: str, key: str) -> str:
    """Validate a public key from config and return its canonical spelling.

    The value is not echoed: a user may have pasted the private key into the wrong field.
    """
    raw = _decode_key(text)
    if raw is None:
        raise ConfigError(source, key, f"malformed public key: {_PUBLIC_FORMAT}")
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ConfigError(source, key, "not a valid Ed25519 public key") from None
    return _encode_key(raw)


def parse_private_key(text: str, source: str, key: str) -> Secret:
    """Validate a private key and wrap it at once; errors never contain the value."""
    raw = _decode_key(text)
    if raw is None:
        raise ConfigError(source, key, _PRIVATE_FORMAT)
    return Secret(_encode_key(raw))


def key_id(public: str) -> str:
    """A short, non-secret id the client sends at login so the relay finds its key directly."""
    raw = _public_raw(_load_public(public))
    return _b64encode(hashlib.sha256(raw).digest()[:KEY_ID_BYTES])


def sign(private: Secret, message: bytes) -> bytes:
    return _load_private(private).sign(message)


def verify(public: str, message: bytes, signature: bytes) -> bool:
    """``True`` only for a valid signature; anything malformed is just ``False``.

    The inputs come from the network, so a bad value must never become an exception that
    a caller could forget to catch (or that would distinguish failure modes).
    """
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        _load_public(public).verify(signature, message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# ----------------------------------------------------------------------------- join string


@dataclass(frozen=True)
class JoinInfo:
    """What a client needs to connect: decoded from, or encoded into, a join string."""

    server_url: str
    fingerprint: str | None
    name: str
    private_key: Secret

    def __repr__(self) -> str:
        return (f"JoinInfo(server_url={self.server_url!r}, fingerprint={self.fingerprint!r}, "
                f"name={self.name!r}, private_key={self.private_key!r})")

    __str__ = __repr__


class _Malformed(Exception):
    """Internal: says what is wrong with a join field, without its value."""


def _check_url(url: object) -> str:
    if not isinstance(url, str):
        raise _Malformed("the server URL is not a string")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise _Malformed("the server URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise _Malformed("the server URL cannot be parsed") from None
    if parts.scheme not in URL_SCHEMES or not url.startswith(f"{parts.scheme}://"):
        raise _Malformed("the server URL must start with ws:// or wss://")
    if not parts.hostname:
        raise _Malformed("the server URL has no host")
    return url


def _check_fingerprint(fingerprint: object) -> str | None:
    if fingerprint is None:
        return None
    if not isinstance(fingerprint, str):
        raise _Malformed("the fingerprint is not a string")
    try:
        return parse_fingerprint(fingerprint, JOIN_SOURCE)
    except ConfigError:
        raise _Malformed("the fingerprint is not sha256: followed by 64 hex digits") from None


#: How much of a rejected client name an error message shows.
MAX_SHOWN_NAME = 80


def shown_name(name: object) -> str:
    """A rejected name made safe to print: escaped like ``ascii()`` and cut short.

    A name is refused precisely because it may hold anything: a bidi override (U+202E) that
    reorders the terminal line, a NUL, control sequences, or 10 KiB. Echoing it raw would
    let the refusal itself mislead whoever reads it (reliability S-10).
    """
    text = ascii(str(name))[1:-1]
    if len(text) > MAX_SHOWN_NAME:
        return f"{text[:MAX_SHOWN_NAME]}... ({len(str(name))} characters)"
    return text


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _Malformed("the client name is not 1-63 letters, digits, '.', '_' or '-'")
    return name


def _check_private_key(private: object) -> Secret:
    if not isinstance(private, str):
        raise _Malformed("the private key is not a string")
    try:
        return parse_private_key(private, JOIN_SOURCE, "")
    except ConfigError:
        raise _Malformed("the private key is malformed") from None


def encode_join(info: JoinInfo) -> str:
    """The join string for ``info``; only ``[A-Za-z0-9_-]``, so it survives any copy-paste.

    Fields are validated the same way :func:`decode_join` does, so the relay never prints a
    string the client would reject. Raises ``ValueError`` (without the key) otherwise.
    """
    try:
        payload = {
            "v": JOIN_VERSION,
            "u": _check_url(info.server_url),
            "f": _check_fingerprint(info.fingerprint),
            "n": _check_name(info.name),
            "k": _check_private_key(info.private_key.reveal()).reveal(),
        }
    except _Malformed as exc:
        raise ValueError(f"cannot encode join string: {exc}") from None
    text = JOIN_PREFIX + _b64encode(json.dumps(payload, separators=(",", ":")).encode("utf-8"))
    if len(text) > MAX_JOIN_LENGTH:
        raise ValueError(f"cannot encode join string: longer than {MAX_JOIN_LENGTH} characters")
    return text


def _malformed(what: str) -> NoReturn:
    raise ConfigError(JOIN_SOURCE, "", f"malformed join string: {what} — {JOIN_HINT}")


def _payload(text: str) -> dict[str, object]:
    """Prefix, size, base64url and JSON layers of a join string, outermost first."""
    if len(text) > MAX_JOIN_LENGTH:
        _malformed(f"longer than {MAX_JOIN_LENGTH} characters")
    if not text.startswith(JOIN_PREFIX):
        _malformed(f"it does not start with {JOIN_PREFIX}")
    raw = _b64decode(text[len(JOIN_PREFIX):])
    if raw is None:
        _malformed("it is not valid base64url (truncated or altered?)")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict):
        _malformed("its content is not a JSON object (truncated or altered?)")
    return data


def decode_join(text: str) -> JoinInfo:
    """Parse a join string pasted by the user; every failure is a ``ConfigError``.

    Errors say which layer or field is wrong but never repeat the string: it holds the
    client's private key and would end up in terminal scrollback and logs.
    """
    data = _payload(text.strip() if isinstance(text, str) else "")
    version = data.get("v")
    if type(version) is not int or version != JOIN_VERSION:
        _malformed(f"unsupported version (this client reads version {JOIN_VERSION})")
    if set(data) != _JOIN_FIELDS:
        _malformed("unexpected or missing fields")
    try:
        return JoinInfo(
            server_url=_check_url(data["u"]),
            fingerprint=_check_fingerprint(data["f"]),
            name=_check_name(data["n"]),
            private_key=_check_private_key(data["k"]),
        )
    except _Malformed as exc:
        problem = str(exc)
    _malformed(problem)  # outside the except block, so no exception chain is attached
