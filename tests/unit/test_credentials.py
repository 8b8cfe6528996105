"""Ed25519 client credentials and the join string: round trips, and failures that never leak."""

from __future__ import annotations

import base64
import json
import re

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tunnel.common.config.credentials import (
    JOIN_PREFIX,
    KEY_PREFIX,
    MAX_JOIN_LENGTH,
    JoinInfo,
    decode_join,
    encode_join,
    generate_keypair,
    key_id,
    parse_private_key,
    parse_public_key,
    public_key_of,
    sign,
    verify,
)
from tunnel.common.errors import ConfigError
from tunnel.common.proto.secret import Secret

FINGERPRINT = "sha256:" + "ab" * 32
URL = "wss://vps.example.com:7000/tunnel"
MESSAGE = b"tunnel-login-v1\x00server-nonce\x00client-nonce"
JOIN_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def no_chained_context(exc: BaseException) -> bool:
    """A traceback shows chained exceptions, whose messages may quote the string or key."""
    return exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


@pytest.fixture
def keypair() -> tuple[Secret, str]:
    return generate_keypair()


@pytest.fixture
def info(keypair: tuple[Secret, str]) -> JoinInfo:
    return JoinInfo(server_url=URL, fingerprint=FINGERPRINT, name="gpu-box.1",
                    private_key=keypair[0])


def raw_join(payload: object) -> str:
    return JOIN_PREFIX + b64(json.dumps(payload).encode())


def payload_of(info: JoinInfo, **changes: object) -> dict[str, object]:
    payload: dict[str, object] = {"v": 1, "u": info.server_url, "f": info.fingerprint,
                                  "n": info.name, "k": info.private_key.reveal()}
    payload.update(changes)
    return payload


# ----------------------------------------------------------------------------- keys


def test_keypair_format(keypair: tuple[Secret, str]) -> None:
    private, public = keypair
    for text in (private.reveal(), public):
        assert text.startswith(KEY_PREFIX)
        body = text[len(KEY_PREFIX):]
        assert len(body) == 43 and "=" not in body and JOIN_ALPHABET.fullmatch(body)
    assert private.reveal() not in repr(private)
    assert public_key_of(private) == public


def test_keypair_matches_cryptography(keypair: tuple[Secret, str]) -> None:
    private, public = keypair
    seed = base64.urlsafe_b64decode(private.reveal()[len(KEY_PREFIX):] + "=")
    expected = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert public == KEY_PREFIX + b64(expected)


def test_keypairs_are_fresh() -> None:
    assert len({generate_keypair()[1] for _ in range(20)}) == 20


def test_sign_verify_round_trip(keypair: tuple[Secret, str]) -> None:
    private, public = keypair
    signature = sign(private, MESSAGE)
    assert len(signature) == 64
    assert verify(public, MESSAGE, signature)
    assert not verify(public, MESSAGE + b"x", signature)


def test_verify_wrong_key_is_false(keypair: tuple[Secret, str]) -> None:
    private, _ = keypair
    _, other_public = generate_keypair()
    assert not verify(other_public, MESSAGE, sign(private, MESSAGE))


@pytest.mark.parametrize("signature", [b"", b"\x00" * 64, b"\xff" * 64, b"x" * 63, b"x" * 65,
                                       "not bytes"])
def test_verify_garbage_signature_is_false(keypair: tuple[Secret, str],
                                           signature: object) -> None:
    assert verify(keypair[1], MESSAGE, signature) is False  # type: ignore[arg-type]


@pytest.mark.parametrize("public", ["", "ed25519:", "ed25519:abc", "rsa:" + "A" * 43,
                                    KEY_PREFIX + "!" * 43, "garbage" * 20])
def test_verify_garbage_public_key_is_false(keypair: tuple[Secret, str], public: str) -> None:
    assert verify(public, MESSAGE, sign(keypair[0], MESSAGE)) is False


def test_verify_non_string_public_key_is_false(keypair: tuple[Secret, str]) -> None:
    assert verify(None, MESSAGE, sign(keypair[0], MESSAGE)) is False  # type: ignore[arg-type]


def test_key_id_stable_and_distinct(keypair: tuple[Secret, str]) -> None:
    _, public = keypair
    assert key_id(public) == key_id(public) == key_id(" " + public + "\n")
    assert key_id(public) != key_id(generate_keypair()[1])
    assert len(key_id(public)) == 22 and JOIN_ALPHABET.fullmatch(key_id(public))
    assert key_id(public) not in public


def test_parse_public_key_normalizes(keypair: tuple[Secret, str]) -> None:
    _, public = keypair
    assert parse_public_key(f"  {public}\n", "relay.yaml", "clients.a.public_key") == public
    assert parse_public_key("ED25519:" + public[len(KEY_PREFIX):], "f", "k") == public


@pytest.mark.parametrize("value", [None, 42, ["x"], "", "ed25519:", "ed25519:" + "A" * 42,
                                   "ed25519:" + "A" * 44, "x25519:" + "A" * 43,
                                   "ed25519:" + "+" * 43, "ed25519:" + "A" * 42 + "B"])
def test_parse_public_key_rejects(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_public_key(value, "relay.yaml", "clients.a.public_key")
    assert "clients.a.public_key" in str(info.value) and "relay.yaml" in str(info.value)


def test_parse_private_key_round_trip_and_no_echo(keypair: tuple[Secret, str]) -> None:
    private, _ = keypair
    parsed = parse_private_key(private.reveal() + "\n", "settings.yaml", "private_key")
    assert isinstance(parsed, Secret) and parsed == private
    broken = private.reveal()[:-3]
    with pytest.raises(ConfigError) as info:
        parse_private_key(broken, "settings.yaml", "private_key")
    assert broken[len(KEY_PREFIX):] not in str(info.value)
    assert no_chained_context(info.value)


# ----------------------------------------------------------------------------- join string


@pytest.mark.parametrize("fingerprint", [FINGERPRINT, None])
def test_join_round_trip(info: JoinInfo, fingerprint: str | None) -> None:
    original = JoinInfo(info.server_url, fingerprint, info.name, info.private_key)
    text = encode_join(original)
    assert text.startswith(JOIN_PREFIX)
    assert JOIN_ALPHABET.fullmatch(text[len(JOIN_PREFIX):])
    assert len(text) <= MAX_JOIN_LENGTH
    decoded = decode_join(f"\n  {text}  \n")
    assert decoded == original
    assert decoded.private_key.reveal() == info.private_key.reveal()


def test_join_payload_is_compact_json(info: JoinInfo) -> None:
    body = encode_join(info)[len(JOIN_PREFIX):]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert b" " not in raw
    assert json.loads(raw) == payload_of(info)


def test_join_normalizes_fingerprint(info: JoinInfo) -> None:
    text = raw_join(payload_of(info, f=FINGERPRINT.upper().replace("SHA256:", "")))
    assert decode_join(text).fingerprint == FINGERPRINT


def test_join_info_hides_key(info: JoinInfo) -> None:
    secret = info.private_key.reveal()
    for text in (repr(info), str(info), f"{info}", f"{info!r}"):
        assert secret not in text
        assert secret[len(KEY_PREFIX):] not in text
        assert info.name in text and "***" in text


def _bad_join_strings(info: JoinInfo) -> dict[str, str]:
    good = encode_join(info)
    return {
        "wrong prefix": "tunnel2_" + good[len(JOIN_PREFIX):],
        "no prefix": good[len(JOIN_PREFIX):],
        "truncated": good[:-10],
        "truncated hard": good[: len(JOIN_PREFIX) + 5],
        "empty": "",
        "not base64": good[:-3] + "!@#",
        "not base64 padding": good + "=",
        "not json": JOIN_PREFIX + b64(b"{not json" + info.private_key.reveal_bytes()),
        "json list": raw_join([1, info.private_key.reveal()]),
        "not utf-8": JOIN_PREFIX + b64(b"\xff\xfe" + info.private_key.reveal_bytes()),
        "wrong version": raw_join(payload_of(info, v=2)),
        "bool version": raw_join(payload_of(info, v=True)),
        "missing version": raw_join({k: v for k, v in payload_of(info).items() if k != "v"}),
        "extra field": raw_join(payload_of(info, x=1)),
        "missing key": raw_join({k: v for k, v in payload_of(info).items() if k != "k"}),
        "http url": raw_join(payload_of(info, u="https://vps.example.com/tunnel")),
        "no scheme": raw_join(payload_of(info, u="vps.example.com:7000")),
        "no host": raw_join(payload_of(info, u="wss:///tunnel")),
        "bad port": raw_join(payload_of(info, u="wss://vps.example.com:99999/tunnel")),
        "space in url": raw_join(payload_of(info, u="wss://vps example.com/")),
        "url not str": raw_join(payload_of(info, u=7)),
        "bad fingerprint": raw_join(payload_of(info, f="sha256:1234")),
        "fingerprint not str": raw_join(payload_of(info, f=123)),
        "bad name": raw_join(payload_of(info, n="-leading-dash")),
        "name too long": raw_join(payload_of(info, n="a" * 64)),
        "name with slash": raw_join(payload_of(info, n="a/b")),
        "empty name": raw_join(payload_of(info, n="")),
        "bad key": raw_join(payload_of(info, k=info.private_key.reveal()[:-2])),
        "key wrong prefix": raw_join(payload_of(info, k="x25519:" + info.private_key.reveal()[8:])),
        "key not str": raw_join(payload_of(info, k=None)),
        "over-long": good + "A" * MAX_JOIN_LENGTH,
    }


BAD_CASES = sorted(_bad_join_strings(JoinInfo(URL, FINGERPRINT, "n",
                                              generate_keypair()[0])))


@pytest.mark.parametrize("case", BAD_CASES)
def test_decode_join_rejects_without_leaking(info: JoinInfo, case: str) -> None:
    text = _bad_join_strings(info)[case]
    secret = info.private_key.reveal()
    with pytest.raises(ConfigError) as excinfo:
        decode_join(text)
    message = str(excinfo.value)
    assert "malformed join string" in message
    assert "tunnel-server add-client" in message
    assert excinfo.value.source == "join string"
    assert secret not in message and secret[len(KEY_PREFIX):] not in message
    assert text[len(JOIN_PREFIX):][:20] not in message or not text
    # Chained exceptions would print the string (or key) in a traceback.
    assert no_chained_context(excinfo.value)


def test_decode_join_rejects_over_long_before_parsing(info: JoinInfo) -> None:
    with pytest.raises(ConfigError, match="longer than"):
        decode_join(JOIN_PREFIX + "A" * MAX_JOIN_LENGTH)


@pytest.mark.parametrize("url", ["ws://10.0.0.5:7000/tunnel", "wss://[2001:db8::1]:443/t",
                                 "wss://relay.example"])
def test_decode_join_accepts_urls(info: JoinInfo, url: str) -> None:
    assert decode_join(raw_join(payload_of(info, u=url))).server_url == url


def test_encode_join_validates_fields(info: JoinInfo) -> None:
    secret = info.private_key.reveal()
    bad = [JoinInfo("https://x", None, info.name, info.private_key),
           JoinInfo(URL, "nope", info.name, info.private_key),
           JoinInfo(URL, None, "bad name", info.private_key),
           JoinInfo(URL, None, info.name, Secret(secret[:-1])),
           JoinInfo("wss://x/" + "a" * MAX_JOIN_LENGTH, None, info.name, info.private_key)]
    for join in bad:
        with pytest.raises(ValueError) as excinfo:
            encode_join(join)
        assert secret not in str(excinfo.value)
