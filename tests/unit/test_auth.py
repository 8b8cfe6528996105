"""Challenge-response login and the Secret wrapper: pure functions, no clock, no network."""

from __future__ import annotations

import hashlib
import hmac
import pickle
from collections.abc import Iterator

import pytest

from tunnel.common.proto.auth import (
    NONCE_SIZE,
    PROOF_SIZE,
    client_proof,
    derive_key,
    identify,
    new_nonce,
)
from tunnel.common.proto.secret import Secret

SERVER_NONCE = bytes(range(32))
CLIENT_NONCE = bytes(range(32, 64))
TOKENS = {"alice": "correct horse battery staple", "bob": "hunter2-hunter2-hunter2",
          "carol": "s3cr3t-with-ünïcödé"}
KEYS = {name: derive_key(Secret(token)) for name, token in TOKENS.items()}


def proof_for(token: str, server_nonce: bytes = SERVER_NONCE,
              client_nonce: bytes = CLIENT_NONCE, binding: bytes = b"") -> bytes:
    return client_proof(derive_key(Secret(token)), server_nonce, client_nonce, binding)


# ----------------------------------------------------------------------------- primitives


def test_nonces_are_fresh_and_sized() -> None:
    nonces = {new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert all(len(n) == NONCE_SIZE == 32 for n in nonces)


def test_key_derivation_golden() -> None:
    key = derive_key(Secret("token"))
    assert key == hashlib.sha256(b"tunnel-key-v1\x00token").digest()
    assert len(key) == 32
    assert derive_key(Secret("token")) == key
    assert derive_key(Secret("token2")) != key


def test_proof_golden() -> None:
    key = derive_key(Secret("token"))
    expected = hmac.new(key, b"tunnel-auth-v1\x00" + SERVER_NONCE + CLIENT_NONCE + b"fp",
                        hashlib.sha256).digest()
    assert client_proof(key, SERVER_NONCE, CLIENT_NONCE, b"fp") == expected
    assert len(expected) == PROOF_SIZE == 32


def test_token_is_not_in_the_proof_or_the_key() -> None:
    token = "a-very-recognisable-token"
    key = derive_key(Secret(token))
    proof = client_proof(key, SERVER_NONCE, CLIENT_NONCE)
    assert token.encode() not in key and token.encode() not in proof


# ----------------------------------------------------------------------------- verification


@pytest.mark.parametrize("name", sorted(TOKENS))
def test_identify_finds_the_right_client_among_several(name: str) -> None:
    assert identify(proof_for(TOKENS[name]), SERVER_NONCE, CLIENT_NONCE, KEYS) == name


def test_proof_does_not_verify_for_another_key() -> None:
    proof = proof_for(TOKENS["alice"])
    assert identify(proof, SERVER_NONCE, CLIENT_NONCE, {"bob": KEYS["bob"]}) is None
    assert identify(proof, SERVER_NONCE, CLIENT_NONCE, {"alice": KEYS["alice"]}) == "alice"


@pytest.mark.parametrize("proof", [
    proof_for("wrong token"),
    proof_for(TOKENS["alice"] + " "),
    proof_for(TOKENS["alice"].upper()),
    b"",
    bytes(PROOF_SIZE),
    proof_for(TOKENS["alice"])[:-1],
    proof_for(TOKENS["alice"]) + b"\x00",
    bytes([proof_for(TOKENS["alice"])[0] ^ 1]) + proof_for(TOKENS["alice"])[1:],
], ids=["unknown-token", "extra-char", "case", "empty", "zeros", "short", "long", "bit-flip"])
def test_identify_rejects_wrong_proofs(proof: bytes) -> None:
    assert identify(proof, SERVER_NONCE, CLIENT_NONCE, KEYS) is None


def test_identify_with_no_clients() -> None:
    assert identify(proof_for(TOKENS["alice"]), SERVER_NONCE, CLIENT_NONCE, {}) is None


def test_proof_for_one_server_nonce_fails_for_another() -> None:
    """A recorded login is useless: the next login gets another server nonce."""
    recorded = proof_for(TOKENS["alice"], server_nonce=SERVER_NONCE)
    other_nonce = bytes(reversed(SERVER_NONCE))
    assert identify(recorded, other_nonce, CLIENT_NONCE, KEYS) is None
    assert identify(recorded, new_nonce(), CLIENT_NONCE, KEYS) is None
    assert identify(recorded, SERVER_NONCE, CLIENT_NONCE, KEYS) == "alice"


def test_proof_is_bound_to_the_client_nonce_and_the_binding() -> None:
    proof = proof_for(TOKENS["bob"], binding=b"relay-A")
    assert identify(proof, SERVER_NONCE, CLIENT_NONCE, KEYS, b"relay-A") == "bob"
    assert identify(proof, SERVER_NONCE, CLIENT_NONCE, KEYS, b"relay-B") is None
    assert identify(proof, SERVER_NONCE, CLIENT_NONCE, KEYS) is None
    assert identify(proof, SERVER_NONCE, new_nonce(), KEYS, b"relay-A") is None


def test_swapped_nonces_do_not_verify() -> None:
    proof = proof_for(TOKENS["alice"])
    assert identify(proof, CLIENT_NONCE, SERVER_NONCE, KEYS) is None


def test_identify_checks_every_key_and_returns_the_first_match() -> None:
    """Two clients sharing a token is refused by config; if it happened, the first wins."""
    calls: list[str] = []

    class Recording(dict[str, bytes]):
        def items(self) -> Iterator[tuple[str, bytes]]:  # type: ignore[override]
            for name, key in super().items():
                calls.append(name)
                yield name, key

    keys = Recording(first=KEYS["alice"], twin=KEYS["alice"], other=KEYS["bob"])
    assert identify(proof_for(TOKENS["alice"]), SERVER_NONCE, CLIENT_NONCE, keys) == "first"
    assert calls == ["first", "twin", "other"]  # no early exit: same work for every answer


# ----------------------------------------------------------------------------- Secret


def test_secret_never_shows_its_value() -> None:
    secret = Secret("tok-123-very-secret")
    texts = [repr(secret), str(secret), f"{secret}", f"{secret!r}", format(secret),
             format(secret, ""), repr([secret]), repr({"token": secret}),
             str(ValueError(secret)), repr(ValueError(secret))]
    for text in texts:
        assert "tok-123" not in text
        assert "very-secret" not in text
    assert repr(secret) == str(secret) == "Secret('***')"


def test_secret_reveals_on_request() -> None:
    secret = Secret("pässword")
    assert secret.reveal() == "pässword"
    assert secret.reveal_bytes() == "pässword".encode()
    assert len(secret) == 8


def test_secret_equality() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert Secret("a") != Secret("a ")
    assert Secret("") == Secret("")
    assert Secret("a") != "a"  # never equal to the bare string
    assert Secret("a").__eq__("a") is NotImplemented
    assert hash(Secret("abc")) == hash(Secret("abc"))
    assert len({Secret("x"), Secret("x"), Secret("y")}) == 2


def test_secret_cannot_be_pickled() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Secret("x"))

