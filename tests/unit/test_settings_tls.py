"""Client settings for TLS: wss by default, pins, keys from `join`, and the join command."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from tunnel.client.join import join_main, write_client_config
from tunnel.client.settings import (
    ClientSettings,
    default_client_config,
    normalize_server_url,
    resolve_client_settings,
)
from tunnel.common.config.credentials import (
    JoinInfo,
    encode_join,
    generate_keypair,
    public_key_of,
)
from tunnel.common.errors import ConfigError
from tunnel.common.proto.secret import Secret

HEX = "0123456789abcdef" * 4
PIN = "sha256:" + HEX
OTHER_HEX = "fedcba9876543210" * 4
THIRD_HEX = "ab" * 32
FLAG_TOKEN = "flag-token-value-00000001"
ENV_TOKEN = "env-token-value-000000002"
FILE_TOKEN = "file-token-value-00000003"
REMOTE = "wss://vps.example.com:7000/tunnel"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never let a developer's real ~/.config/tunnel/client.yaml leak into a test."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _resolve(*, server: str | None = None, token: str | None = FLAG_TOKEN,
             config_path: str | Path | None = None, env: Mapping[str, str] | None = None,
             fingerprint: str | None = None, ca_file: str | None = None,
             insecure: bool = False) -> ClientSettings:
    return resolve_client_settings(
        server=server, token=token, exposes=["8888"],
        config_path=None if config_path is None else str(config_path),
        env=env or {}, fingerprint=fingerprint, ca_file=ca_file, insecure=insecure)


def _file(tmp_path: Path, text: str, name: str = "client.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- scheme and transport -------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("vps.example.com:7000", "wss://vps.example.com:7000/tunnel"),
    ("203.0.113.5:7000/relay", "wss://203.0.113.5:7000/relay"),
    ("[2001:db8::1]:7000", "wss://[2001:db8::1]:7000/tunnel"),
    ("localhost:7000", "wss://localhost:7000/tunnel"),
])
def test_bare_address_means_wss(value: str, expected: str) -> None:
    assert normalize_server_url(value, "--server") == expected
    assert _resolve(server=value).server_url == expected


@pytest.mark.parametrize("server", [
    "ws://vps.example.com:7000",
    "http://vps.example.com:7000",
    "ws://203.0.113.5:7000/tunnel",
    "ws://[2001:db8::1]:7000",
    "ws://localhost.example.com:7000",
    "ws://10.0.0.1:7000",
])
def test_plain_ws_to_remote_needs_insecure(server: str) -> None:
    with pytest.raises(ConfigError, match="--insecure") as info:
        _resolve(server=server)
    assert FLAG_TOKEN not in str(info.value)
    settings = _resolve(server=server, insecure=True)
    assert settings.server_url.startswith("ws://")
    assert settings.insecure is True


@pytest.mark.parametrize("server", [
    "ws://127.0.0.1:7000",
    "ws://127.0.0.53:7000",
    "ws://[::1]:7000",
    "ws://localhost:7000",
    "ws://LOCALHOST:7000",
    "http://127.0.0.1:7000/x",
])
def test_plain_ws_to_loopback_is_allowed(server: str) -> None:
    settings = _resolve(server=server)
    assert settings.server_url.startswith("ws://")
    assert settings.insecure is False


def test_wss_to_remote_is_fine() -> None:
    settings = _resolve(server=REMOTE)
    assert settings.server_url == REMOTE
    assert settings.fingerprint is None and settings.insecure is False


@pytest.mark.parametrize("server", ["ws://127.0.0.1:7000", "ws://vps.example.com:7000"])
def test_fingerprint_needs_wss(server: str) -> None:
    with pytest.raises(ConfigError, match="wss://"):
        _resolve(server=server, fingerprint=PIN, insecure=True)


def test_fingerprint_from_file_with_ws_flag_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, f"server: {REMOTE}\nfingerprint: {PIN}\n")
    with pytest.raises(ConfigError, match="wss://"):
        _resolve(server="ws://127.0.0.1:7000", config_path=path)


# --- fingerprint ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    PIN,
    PIN.upper(),
    HEX,
    HEX.upper(),
    "sha256:" + ":".join(HEX[i:i + 2] for i in range(0, 64, 2)).upper(),
    f"  {PIN}  ",
])
def test_fingerprint_is_normalized(value: str) -> None:
    assert _resolve(server=REMOTE, fingerprint=value).fingerprint == PIN


def test_fingerprint_precedence_flag_env_file(tmp_path: Path) -> None:
    path = _file(tmp_path, f"server: {REMOTE}\nfingerprint: sha256:{THIRD_HEX}\n")
    env = {"TUNNEL_FINGERPRINT": OTHER_HEX.upper()}
    assert _resolve(config_path=path).fingerprint == f"sha256:{THIRD_HEX}"
    assert _resolve(config_path=path, env=env).fingerprint == f"sha256:{OTHER_HEX}"
    assert _resolve(config_path=path, env=env, fingerprint=HEX).fingerprint == PIN
    # An empty variable counts as unset.
    assert (_resolve(config_path=path, env={"TUNNEL_FINGERPRINT": ""}).fingerprint
            == f"sha256:{THIRD_HEX}")


def test_file_fingerprint_null_means_none(tmp_path: Path) -> None:
    path = _file(tmp_path, f"server: {REMOTE}\nfingerprint:\n")
    assert _resolve(config_path=path).fingerprint is None


BAD_PIN = "sha256:" + "zz" * 32


@pytest.mark.parametrize("value", [
    BAD_PIN,
    "sha256:" + HEX[:-2],
    "md5:" + HEX,
    "tunnel1_this-is-secret-material",
    "x" * 500,
])
def test_malformed_fingerprint_from_flag_not_echoed(value: str) -> None:
    with pytest.raises(ConfigError, match="malformed fingerprint") as info:
        _resolve(server=REMOTE, fingerprint=value)
    assert value.strip() not in str(info.value)
    assert info.value.source == "--fingerprint"


def test_malformed_fingerprint_from_env_names_env_not_value() -> None:
    with pytest.raises(ConfigError) as info:
        _resolve(server=REMOTE, env={"TUNNEL_FINGERPRINT": BAD_PIN})
    assert info.value.source == "TUNNEL_FINGERPRINT"
    assert BAD_PIN not in str(info.value)


def test_malformed_fingerprint_from_file_names_key_not_value(tmp_path: Path) -> None:
    path = _file(tmp_path, f"server: {REMOTE}\nfingerprint: '{BAD_PIN}'\n")
    with pytest.raises(ConfigError) as info:
        _resolve(config_path=path)
    assert info.value.source == str(path)
    assert info.value.key == "fingerprint"
    assert BAD_PIN not in str(info.value)


def test_fingerprint_wrong_type_in_file(tmp_path: Path) -> None:
    path = _file(tmp_path, f"server: {REMOTE}\nfingerprint: 12345\n")
    with pytest.raises(ConfigError) as info:
        _resolve(config_path=path)
    assert info.value.key == "fingerprint"


# --- key from join ----------------------------------------------------------------------------


def test_file_key_gives_private_key_and_no_token(tmp_path: Path) -> None:
    private, public = generate_keypair()
    path = _file(tmp_path, f"server: {REMOTE}\nname: alice\nkey: {private.reveal()}\n")
    settings = _resolve(token=None, config_path=path)
    assert settings.token is None
    assert settings.private_key == private
    assert settings.private_key is not None
    assert public_key_of(settings.private_key) == public
    assert private.reveal() not in repr(settings)


@pytest.mark.parametrize("source", ["flag", "env"])
def test_token_from_flag_or_env_beats_file_key(tmp_path: Path, source: str) -> None:
    private, _ = generate_keypair()
    path = _file(tmp_path, f"server: {REMOTE}\nkey: {private.reveal()}\n")
    if source == "flag":
        settings = _resolve(token=FLAG_TOKEN, config_path=path)
        expected = FLAG_TOKEN
    else:
        settings = _resolve(token=None, config_path=path, env={"TUNNEL_TOKEN": ENV_TOKEN})
        expected = ENV_TOKEN
    assert settings.token == Secret(expected)
    assert settings.private_key is None


@pytest.mark.parametrize("other", [
    f"token: {FILE_TOKEN}",
    "token_env: SOME_VAR",
    "token_file: tok.txt",
])
def test_file_key_and_token_conflict(tmp_path: Path, other: str) -> None:
    private, _ = generate_keypair()
    path = _file(tmp_path, f"server: {REMOTE}\nkey: {private.reveal()}\n{other}\n")
    with pytest.raises(ConfigError, match="conflicting") as info:
        _resolve(token=None, config_path=path, env={"SOME_VAR": ENV_TOKEN})
    assert info.value.key == "key"
    message = str(info.value)
    assert private.reveal() not in message
    assert FILE_TOKEN not in message and ENV_TOKEN not in message


@pytest.mark.parametrize("suffix", ["AA", "!", ""])
def test_malformed_file_key_not_echoed(tmp_path: Path, suffix: str) -> None:
    private, _ = generate_keypair()
    value = (private.reveal() + suffix) if suffix else private.reveal()[:-4]
    path = _file(tmp_path, f"server: {REMOTE}\nkey: '{value}'\n")
    with pytest.raises(ConfigError) as info:
        _resolve(token=None, config_path=path)
    assert info.value.key == "key"
    assert private.reveal()[8:30] not in str(info.value)


def test_file_key_wrong_type(tmp_path: Path) -> None:
    path = _file(tmp_path, f"server: {REMOTE}\nkey: [a, b]\n")
    with pytest.raises(ConfigError) as info:
        _resolve(token=None, config_path=path)
    assert info.value.key == "key"


# --- default file, insecure, ca_file ------------------------------------------------------------


def test_default_client_config_uses_xdg(tmp_path: Path) -> None:
    assert default_client_config() == tmp_path / "xdg" / "tunnel" / "client.yaml"


@pytest.mark.parametrize("xdg", [None, ""])
def test_default_client_config_falls_back_to_home(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  xdg: str | None) -> None:
    if xdg is None:
        monkeypatch.delenv("XDG_CONFIG_HOME")
    else:
        monkeypatch.setenv("XDG_CONFIG_HOME", xdg)
    assert default_client_config() == tmp_path / "home" / ".config" / "tunnel" / "client.yaml"


def test_default_file_is_read_when_no_config_path(tmp_path: Path) -> None:
    private, _ = generate_keypair()
    _file(tmp_path / "xdg" / "tunnel", f"server: {REMOTE}\nfingerprint: {PIN}\n"
                                       f"key: {private.reveal()}\nexpose: ['9999']\n")
    settings = resolve_client_settings(server=None, token=None, exposes=[],
                                       config_path=None, env={})
    assert settings.server_url == REMOTE
    assert settings.fingerprint == PIN
    assert settings.private_key == private
    assert [spec.local_port for spec in settings.exposes] == [9999]


def test_default_file_under_home_without_xdg(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME")
    _file(tmp_path / "home" / ".config" / "tunnel", f"server: {REMOTE}\n")
    assert _resolve().server_url == REMOTE


def test_no_default_file_needs_flags() -> None:
    with pytest.raises(ConfigError) as info:
        _resolve()
    assert info.value.key == "server"


def test_explicit_config_path_wins_over_default_file(tmp_path: Path) -> None:
    _file(tmp_path / "xdg" / "tunnel", "server: default.example.com:1\n")
    path = _file(tmp_path, f"server: {REMOTE}\n", name="other.yaml")
    assert _resolve(config_path=path).server_url == REMOTE


def test_file_insecure_true_is_honoured(tmp_path: Path) -> None:
    path = _file(tmp_path, "server: ws://vps.example.com:7000\ninsecure: true\n")
    settings = _resolve(config_path=path)
    assert settings.insecure is True
    assert settings.server_url == "ws://vps.example.com:7000/tunnel"


def test_file_insecure_false_keeps_the_refusal(tmp_path: Path) -> None:
    path = _file(tmp_path, "server: ws://vps.example.com:7000\ninsecure: false\n")
    with pytest.raises(ConfigError, match="--insecure"):
        _resolve(config_path=path)
    assert _resolve(config_path=path, insecure=True).insecure is True


def test_file_ca_file_is_relative_to_the_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    _file(conf, f"server: {REMOTE}\nca_file: certs/ca.pem\n")
    monkeypatch.chdir(tmp_path)
    settings = _resolve(config_path="conf/client.yaml")
    assert settings.ca_file is not None
    assert settings.ca_file.is_absolute()
    assert settings.ca_file.resolve() == (conf / "certs" / "ca.pem").resolve()


def test_ca_file_flag_beats_file(tmp_path: Path) -> None:
    path = _file(tmp_path, f"server: {REMOTE}\nca_file: /etc/file-ca.pem\n")
    assert _resolve(config_path=path, ca_file="/flag/ca.pem").ca_file == Path("/flag/ca.pem")
    assert _resolve(config_path=path).ca_file == Path("/etc/file-ca.pem")
    assert _resolve(server=REMOTE).ca_file is None


# --- join ---------------------------------------------------------------------------------------


def _info(server: str = REMOTE, fingerprint: str | None = PIN,
          name: str = "alice") -> JoinInfo:
    private, _ = generate_keypair()
    return JoinInfo(server, fingerprint, name, private)


def test_write_client_config_is_private(tmp_path: Path) -> None:
    info = _info()
    path = tmp_path / "cfg" / "tunnel" / "client.yaml"
    write_client_config(info, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    data = yaml.safe_load(path.read_text())
    assert data == {"server": REMOTE, "name": "alice", "fingerprint": PIN,
                    "key": info.private_key.reveal()}
    assert os.listdir(path.parent) == ["client.yaml"]  # no temp file left behind


def test_write_client_config_without_pin_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "client.yaml"
    path.write_text("old: content\n")
    path.chmod(0o644)
    info = _info(fingerprint=None)
    write_client_config(info, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = yaml.safe_load(path.read_text())
    assert "fingerprint" not in data
    assert data["key"] == info.private_key.reveal()


def test_written_file_resolves_to_the_same_settings(tmp_path: Path) -> None:
    info = _info()
    path = tmp_path / "client.yaml"
    write_client_config(info, path)
    settings = _resolve(token=None, config_path=path)
    assert settings.server_url == info.server_url
    assert settings.fingerprint == info.fingerprint
    assert settings.private_key == info.private_key
    assert settings.token is None


def test_join_main_writes_default_file_and_roundtrips(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    info = _info(server="wss://[2001:db8::1]:7443/relay")
    join = encode_join(info)
    assert join_main([join]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert info.private_key.reveal() not in out and join not in out
    path = tmp_path / "xdg" / "tunnel" / "client.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    settings = resolve_client_settings(server=None, token=None, exposes=["8888"],
                                       config_path=None, env={})
    assert settings.server_url == info.server_url
    assert settings.fingerprint == info.fingerprint
    assert settings.private_key == info.private_key


def test_join_main_config_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = _info()
    path = tmp_path / "a" / "b.yaml"
    assert join_main([encode_join(info), "--config", str(path)]) == 0
    assert yaml.safe_load(path.read_text())["name"] == "alice"
    assert not (tmp_path / "xdg").exists()
    capsys.readouterr()


def _malformed_inputs() -> list[str]:
    join = encode_join(_info())
    body = join.removeprefix("tunnel1_")
    flipped = body[:40] + ("A" if body[40] != "A" else "B") + body[41:]
    return [
        "not-a-join-string-SECRETSECRET",
        "tunnel1_",
        join[:-7],
        "tunnel1_" + flipped,
        "tunnel2_" + body,
        join + "!!",
        "tunnel1_" + "QUJD" * 600,
    ]


@pytest.mark.parametrize("text", _malformed_inputs())
def test_join_main_malformed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             text: str) -> None:
    path = tmp_path / "client.yaml"
    assert join_main([text, "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1
    assert "malformed join string" in lines[0]
    assert text not in err
    body = text.removeprefix("tunnel1_")
    if body:
        assert body[:24] not in err
    assert not path.exists()


def test_join_main_refuses_to_overwrite_without_force(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "client.yaml"
    path.write_text("server: old.example.com:1\n")
    first, second = _info(name="first"), _info(name="second")
    assert join_main([encode_join(first), "--config", str(path)]) == 2
    _, err = capsys.readouterr()
    assert "--force" in err
    assert first.private_key.reveal() not in err
    assert path.read_text() == "server: old.example.com:1\n"
    assert join_main([encode_join(second), "--config", str(path), "--force"]) == 0
    data = yaml.safe_load(path.read_text())
    assert data["name"] == "second"
    assert data["key"] == second.private_key.reveal()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    capsys.readouterr()


@pytest.mark.parametrize(("server", "expected"), [
    ("wss://vps.example.com/tunnel", "wss://vps.example.com:443/tunnel"),
    ("wss://[2001:db8::1]/relay", "wss://[2001:db8::1]:443/relay"),
])
def test_join_without_port_roundtrips(tmp_path: Path, server: str, expected: str) -> None:
    # public_url and join strings accept a URL without a port; the client must too.
    info = _info(server=server)
    path = tmp_path / "client.yaml"
    write_client_config(info, path)
    settings = _resolve(token=None, config_path=path)
    assert settings.server_url == expected
    assert settings.fingerprint == PIN
