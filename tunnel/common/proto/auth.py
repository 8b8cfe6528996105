"""Challenge-response login: the token never crosses the wire.

The relay opens with a fresh 32-byte nonce. The client answers with its own nonce and
``HMAC-SHA256(key, context || server_nonce || client_nonce || binding)`` where ``key`` is
derived from the token, or (clients onboarded with ``join``) an Ed25519 signature over the
same message, so the relay needs only the client's public key. The relay recomputes the
HMAC proof for *every* token client and compares each in constant time without stopping
early, so the answer and its timing are the same for "unknown client" and "wrong token".
A recorded login is useless: the next login gets another server nonce. ``binding`` is a
seam for TLS channel binding (the certificate fingerprint), so a proof made for one relay
cannot be relayed to another.

Nothing here depends on the two machines' clocks.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

from tunnel.common.proto.secret import Secret

__all__ = [
    "NONCE_SIZE",
    "PROOF_SIZE",
    "client_proof",
    "derive_key",
    "identify",
    "login_message",
    "new_nonce",
]

NONCE_SIZE = 32
PROOF_SIZE = 32
_KEY_CONTEXT = b"tunnel-key-v1\x00"
_PROOF_CONTEXT = b"tunnel-auth-v1\x00"


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def derive_key(token: Secret) -> bytes:
    """The HMAC key; the relay may keep this instead of the token itself."""
    return hashlib.sha256(_KEY_CONTEXT + token.reveal_bytes()).digest()


def login_message(server_nonce: bytes, client_nonce: bytes, binding: bytes = b"") -> bytes:
    """What a client proves knowledge of: HMAC'd with a token key, or signed with Ed25519."""
    return _PROOF_CONTEXT + server_nonce + client_nonce + binding


def client_proof(key: bytes, server_nonce: bytes, client_nonce: bytes,
                 binding: bytes = b"") -> bytes:
    message = login_message(server_nonce, client_nonce, binding)
    return hmac.new(key, message, hashlib.sha256).digest()


def identify(proof: bytes, server_nonce: bytes, client_nonce: bytes,
             keys: Mapping[str, bytes], binding: bytes = b"") -> str | None:
    """Return the name whose key made ``proof``, checking all of them in constant time."""
    found: str | None = None
    for name, key in keys.items():
        expected = client_proof(key, server_nonce, client_nonce, binding)
        if hmac.compare_digest(expected, proof) and found is None:
            found = name
    return found
