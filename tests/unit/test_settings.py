"""Client settings: relay URL normalization and flags > environment > file precedence."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tunnel.client.expose import ExposeSpec
from tunnel.client.settings import (
    ClientSettings,
    normalize_server_url,
    resolve_client_settings,
)
from tunnel.common.errors import ConfigError
from tunnel.common.proto.secret import Secret

FLAG_TOKEN = "flag-token-value-0000001"
ENV_TOKEN = "env-token-value-00000002"
FILE_TOKEN = "file-token-value-0000003"
ALL_TOKENS = (FLAG_TOKEN, ENV_TOKEN, FILE_TOKEN)


@pytest.mark.parametrize(("value", "expected"), [
    ("vps.example.com:7000", "wss://vps.example.com:7000/tunnel"),
    ("wss://vps.example.com/tunnel", "wss://vps.example.com:443/tunnel"),
    ("ws://vps.example.com", "ws://vps.example.com:80/tunnel"),
    ("https://[::1]/t", "wss://[::1]:443/t"),
    ("VPS.Example.com:7000", "wss://vps.example.com:7000/tunnel"),
    ("ws://vps.example.com:7000", "ws://vps.example.com:7000/tunnel"),
    ("ws://vps.example.com:7000/", "ws://vps.example.com:7000/tunnel"),
    ("ws://vps.example.com:7000/relay/v1", "ws://vps.example.com:7000/relay/v1"),
    ("wss://vps.example.com:443/tunnel", "wss://vps.example.com:443/tunnel"),
    ("http://1.2.3.4:7000", "ws://1.2.3.4:7000/tunnel"),
    ("HTTPS://vps.example.com:8443/x", "wss://vps.example.com:8443/x"),
    ("[::1]:7000", "wss://[::1]:7000/tunnel"),
    ("wss://[2001:DB8::1]:7000/t", "wss://[2001:db8::1]:7000/t"),
    ("  vps.example.com:7000  ", "wss://vps.example.com:7000/tunnel"),
    ("vps.example.com:7000/custom", "wss://vps.example.com:7000/custom"),
])
def test_normalize_server_url(value: str, expected: str) -> None:
    assert normalize_server_url(value, "--server") == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("vps.example.com", "missing port"),
    ("vps.example.com/tunnel", "missing port"),
    ("ftp://vps.example.com:7000", "unsupported scheme"),
    ("ws://vps.example.com:7000/t?token=x", "query strings"),
    ("ws://vps.example.com:7000/t#frag", "fragments"),
    ("vps.example.com:0", "port must be 1-65535"),
    ("vps.example.com:70000", "port must be 1-65535"),
    ("vps.example.com:07000", "port must be 1-65535"),
    ("::1:7000", "not a valid host name"),
    ("[::zz]:7000", "not an IPv6 address"),
    ("[::1]", "missing port"),
    (":7000", "not a valid host name"),
    ("", "missing port"),
    ("vps example.com:7000", "spaces"),
])
def test_normalize_server_url_rejects(value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=r"^--server: ") as info:
        normalize_server_url(value, "--server")
    assert expected in str(info.value)


def test_userinfo_rejected_without_echo() -> None:
    with pytest.raises(ConfigError, match="credentials do not belong in the URL") as info:
        normalize_server_url("ws://user:hunter2-secret@vps:7000/tunnel", "TUNNEL_SERVER")
    assert "hunter2-secret" not in str(info.value)


# --- precedence ----------------------------------------------------------------------------


def _write_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "client.yaml"
    path.write_text(text)
    return str(path)


_FILE = f"""\
server: file.example.com:7000
token: "{FILE_TOKEN}"
expose:
  - "8888:fixed-6000"
  - "6006"
"""


def _resolve(*, server: str | None = None, token: str | None = None,
             exposes: Sequence[str] = (), config_path: str | None = None,
             env: Mapping[str, str] | None = None) -> ClientSettings:
    return resolve_client_settings(server=server, token=token, exposes=exposes,
                                   config_path=config_path, env=env or {})


def test_file_only(tmp_path: Path) -> None:
    settings = _resolve(config_path=_write_file(tmp_path, _FILE))
    assert settings.server_url == "wss://file.example.com:7000/tunnel"
    assert settings.server_host == "file.example.com"
    assert settings.token == Secret(FILE_TOKEN)
    assert settings.exposes == (ExposeSpec("127.0.0.1", 8888, "fixed", 6000),
                                ExposeSpec("127.0.0.1", 6006, "auto", None))


def test_env_beats_file(tmp_path: Path) -> None:
    env = {"TUNNEL_SERVER": "wss://env.example.com:443", "TUNNEL_TOKEN": ENV_TOKEN}
    settings = _resolve(config_path=_write_file(tmp_path, _FILE), env=env)
    assert settings.server_url == "wss://env.example.com:443/tunnel"
    assert settings.token == Secret(ENV_TOKEN)
    assert len(settings.exposes) == 2


def test_flags_beat_env_and_file(tmp_path: Path) -> None:
    env = {"TUNNEL_SERVER": "env.example.com:7000", "TUNNEL_TOKEN": ENV_TOKEN}
    settings = _resolve(server="flag.example.com:7001", token=FLAG_TOKEN,
                        exposes=["22:6022"], config_path=_write_file(tmp_path, _FILE), env=env)
    assert settings.server_url == "wss://flag.example.com:7001/tunnel"
    assert settings.server_host == "flag.example.com"
    assert settings.token == Secret(FLAG_TOKEN)
    assert settings.exposes == (ExposeSpec("127.0.0.1", 22, "fixed", 6022),)


def test_empty_env_counts_as_unset(tmp_path: Path) -> None:
    settings = _resolve(config_path=_write_file(tmp_path, _FILE),
                        env={"TUNNEL_SERVER": "", "TUNNEL_TOKEN": ""})
    assert settings.token == Secret(FILE_TOKEN)


def test_no_file_needed() -> None:
    settings = _resolve(server="[::1]:7000", token=FLAG_TOKEN, exposes=["6006"])
    assert settings.server_host == "[::1]"
    assert "flag-token" not in repr(settings)


def test_file_token_env_and_token_file(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text(FILE_TOKEN + "\n")
    (tmp_path / "tok").chmod(0o600)
    path = _write_file(tmp_path, "server: h:1\ntoken_file: tok\nexpose: ['1']\n")
    assert _resolve(config_path=path).token == Secret(FILE_TOKEN)
    path = _write_file(tmp_path, "server: h:1\ntoken_env: MY_TOKEN\nexpose: ['1']\n")
    assert _resolve(config_path=path, env={"MY_TOKEN": ENV_TOKEN}).token == Secret(ENV_TOKEN)


def test_unused_file_token_source_is_not_resolved(tmp_path: Path) -> None:
    path = _write_file(tmp_path, "server: h:1\ntoken_env: NOT_SET_ANYWHERE\nexpose: ['1']\n")
    assert _resolve(config_path=path, token=FLAG_TOKEN).token == Secret(FLAG_TOKEN)


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(("server", "token", "exposes", "expected"), [
    (None, FLAG_TOKEN, ["1"], "--server HOST:PORT, set TUNNEL_SERVER"),
    ("h:1", None, ["1"], "pass --token, set TUNNEL_TOKEN"),
    ("h:1", FLAG_TOKEN, [], "nothing to expose; pass --expose"),
])
def test_missing_settings_name_what_to_set(server: str | None, token: str | None,
                                           exposes: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=r"^tunnel-client: ") as info:
        _resolve(server=server, token=token, exposes=exposes)
    assert expected in str(info.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("server: h:1\ntokn: x\n", "tokn: unknown key; allowed keys: server, token"),
    (f"server: h:1\ntoken: '{FILE_TOKEN}'\nexpose: '6006'\n", "expose: expected a list"),
    (f"server: h:1\ntoken: '{FILE_TOKEN}'\nexpose:\n  - 8888:30\n",
     "expose[0]: integer '8888:30' must be written in plain decimal (line 4, column 5); quote it"),
    (f"server: h:1\ntoken: '{FILE_TOKEN}'\nexpose: ['8888:bogus']\n",
     "expose[0]: 8888:bogus: REMOTE must be fixed-N, N or auto"),
    (f"server: 7000\ntoken: '{FILE_TOKEN}'\nexpose: ['1']\n", "server: expected"),
    (f"server: 'h'\ntoken: '{FILE_TOKEN}'\nexpose: ['1']\n", "server: invalid relay address"),
    ("server: h:1\ntoken: short-file-tok\nexpose: ['1']\n", "token: the token is too short"),
    (f"server: h:1\ntoken: '{FILE_TOKEN}'\ntoken_env: X\nexpose: ['1']\n",
     "conflicting token sources"),
    ("- server\n", "expected a mapping of settings at the top level"),
])
def test_file_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = _write_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        _resolve(config_path=path)
    message = str(info.value)
    assert message.startswith(path)
    assert expected in message
    assert FILE_TOKEN not in message
    assert "short-file-tok" not in message


def test_short_flag_and_env_tokens_are_not_echoed() -> None:
    with pytest.raises(ConfigError, match=r"^--token: the token is too short") as info:
        _resolve(server="h:1", token="flag-short", exposes=["1"])
    assert "flag-short" not in str(info.value)
    with pytest.raises(ConfigError, match=r"^TUNNEL_TOKEN: the token is too short") as info:
        _resolve(server="h:1", exposes=["1"], env={"TUNNEL_TOKEN": "env-short"})
    assert "env-short" not in str(info.value)


def test_server_error_names_env_source() -> None:
    with pytest.raises(ConfigError, match=r"^TUNNEL_SERVER: invalid relay address"):
        _resolve(token=FLAG_TOKEN, exposes=["1"], env={"TUNNEL_SERVER": "nohost"})


def test_duplicate_fixed_remote_port() -> None:
    with pytest.raises(ConfigError, match="remote port 6000 is claimed twice"):
        _resolve(server="h:1", token=FLAG_TOKEN, exposes=["8888:6000", "22:fixed-6000"])


def test_flag_expose_error_names_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--expose: 8888:x: "):
        _resolve(server="h:1", token=FLAG_TOKEN, exposes=["8888:x"])


def test_tokens_never_in_any_message(tmp_path: Path) -> None:
    path = _write_file(tmp_path, _FILE.replace("file.example.com:7000", "ws://u:p@h:1"))
    with pytest.raises(ConfigError) as info:
        _resolve(config_path=path, token=FLAG_TOKEN, env={"TUNNEL_TOKEN": ENV_TOKEN})
    for token in (*ALL_TOKENS, "u:p"):
        assert token not in str(info.value)


# --- source address ------------------------------------------------------------------------


def test_source_address_from_flag_beats_file_and_is_normalized(tmp_path: Path) -> None:
    path = _write_file(tmp_path, _FILE + "source_address: 10.0.0.7\n")
    assert _resolve(config_path=path).source_address == "10.0.0.7"
    flagged = resolve_client_settings(server=None, token=None, exposes=(), config_path=path,
                                      env={}, source_address="[2001:DB8::1]")
    assert flagged.source_address == "2001:db8::1"
    assert _resolve(server="vps:7000", token=FLAG_TOKEN, exposes=["22"]).source_address is None


def test_source_address_must_be_an_ip(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as flag_error:
        resolve_client_settings(server="vps:7000", token=FLAG_TOKEN, exposes=["22"],
                                config_path=None, env={}, source_address="eth0")
    assert str(flag_error.value).startswith("--source-address")
    assert "'eth0' is not an IP address" in str(flag_error.value)
    path = _write_file(tmp_path, _FILE + "source_address: lab-uplink\n")
    with pytest.raises(ConfigError) as file_error:
        _resolve(config_path=path)
    text = str(file_error.value)
    assert "client.yaml" in text and "source_address" in text and "line 6" in text, text
