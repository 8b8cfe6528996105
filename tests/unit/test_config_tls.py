"""Relay config: ``tls``, ``public_url``, ``clients_file`` and public-key client entries."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunnel.common.config.credentials import generate_keypair
from tunnel.common.errors import ConfigError
from tunnel.common.proto.portset import PortSet
from tunnel.common.proto.secret import Secret
from tunnel.server.config import (
    ClientEntry,
    ServerConfig,
    TlsSettings,
    load_clients_file,
    load_server_config,
    parse_server_config,
)

BASE = 'listen: "0.0.0.0:7000"\nports: ["6000-6099"]\n'
TOKEN_A = "token-a-value-000000000001"
TOKEN_B = "token-b-value-000000000002"


def _load(tmp_path: Path, extra: str = "", env: dict[str, str] | None = None) -> ServerConfig:
    path = tmp_path / "server.yaml"
    path.write_text(BASE + extra)
    return load_server_config(path, env or {})


def _error(tmp_path: Path, extra: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, extra, env)
    return info.value


def _parse(**top: object) -> ServerConfig:
    data: dict[str, object] = {"listen": "0.0.0.0:7000", "ports": ["6000-6099"], **top}
    return parse_server_config(data, "server.yaml", Path("/etc/tunnel"), {})


# --- tls -----------------------------------------------------------------------------------


def test_tls_absent_means_auto(tmp_path: Path) -> None:
    config = _load(tmp_path)
    assert config.tls == TlsSettings("auto")
    assert config.tls.cert is None and config.tls.key is None


@pytest.mark.parametrize("value", ["auto", "AUTO", '"auto"', "Auto"])
def test_tls_auto(tmp_path: Path, value: str) -> None:
    assert _load(tmp_path, f"tls: {value}\n").tls == TlsSettings("auto")


@pytest.mark.parametrize("value", ["off", "false", "no", "False", '"off"', '"OFF"', "'Off'"])
def test_tls_off(tmp_path: Path, value: str) -> None:
    # Unquoted off/false/no are YAML 1.1 booleans; a quoted "off" is the string.
    assert _load(tmp_path, f"tls: {value}\n").tls == TlsSettings("off")


def test_tls_files_relative_to_config_dir(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "server.yaml").write_text(BASE + "tls:\n  cert: certs/relay.crt\n"
                                                  "  key: /abs/relay.key\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_server_config(Path("..") / "etc" / "server.yaml", {})
    assert config.tls.mode == "files"
    assert config.tls.cert is not None and config.tls.key is not None
    assert config.tls.cert.is_absolute()
    assert config.tls.cert.resolve() == (conf_dir / "certs" / "relay.crt").resolve()
    assert config.tls.key == Path("/abs/relay.key")


def test_tls_files_via_parse_uses_base_dir() -> None:
    config = _parse(tls={"cert": "c.pem", "key": "k.pem"})
    assert config.tls == TlsSettings("files", Path("/etc/tunnel/c.pem"),
                                     Path("/etc/tunnel/k.pem"))


@pytest.mark.parametrize("value", [
    "true",
    "on",  # YAML 1.1 boolean true
    '"on"',
    "null",
    "''",
    "1",
    "files",
    "self-signed",
    "[cert.pem, key.pem]",
    "{cert: c.pem}",
    "{key: k.pem}",
    "{}",
    "{cert: c.pem, key: k.pem, ca: ca.pem}",
    "{cert: 1, key: k.pem}",
    "{cert: c.pem, key: [k.pem]}",
])
def test_tls_invalid_names_tls(tmp_path: Path, value: str) -> None:
    exc = _error(tmp_path, f"tls: {value}\n")
    assert exc.key == "tls" or exc.key.startswith("tls.")
    assert "tls" in str(exc)


def test_tls_error_comes_first_and_names_allowed_values(tmp_path: Path) -> None:
    exc = _error(tmp_path, "tls: maybe\n")
    assert exc.key == "tls"
    assert "auto" in exc.message and "off" in exc.message


# --- public_url ----------------------------------------------------------------------------


def test_public_url_absent_is_none(tmp_path: Path) -> None:
    assert _load(tmp_path).public_url is None


@pytest.mark.parametrize("url", [
    "wss://vps.example.com:7000/tunnel",
    "ws://127.0.0.1:7000/tunnel",
    "wss://[2001:db8::1]:7000/tunnel",
    "wss://203.0.113.5:443/relay/v1",
])
def test_public_url_accepted(tmp_path: Path, url: str) -> None:
    assert _load(tmp_path, f'public_url: "{url}"\n').public_url == url


@pytest.mark.parametrize("value", [
    '"https://vps.example.com:7000/tunnel"',
    '"http://vps.example.com:7000/tunnel"',
    '"ftp://vps.example.com:7000/tunnel"',
    '"vps.example.com:7000"',
    '"wss://"',
    '"wss:///tunnel"',
    '"wss://vps.example.com:7000/tunnel?token=abc"',
    '"wss://vps.example.com:7000/tunnel#frag"',
    '"wss://user@vps.example.com:7000/tunnel"',
    '"wss://user:pw@vps.example.com:7000/tunnel"',
    '""',
    "7000",
    "null",
    "[wss://vps.example.com:7000/tunnel]",
])
def test_public_url_rejected(tmp_path: Path, value: str) -> None:
    exc = _error(tmp_path, f"public_url: {value}\n")
    assert exc.key == "public_url"


def test_public_url_rejects_password_only_userinfo(tmp_path: Path) -> None:
    exc = _error(tmp_path, 'public_url: "wss://:secret@vps.example.com:7000/tunnel"\n')
    assert exc.key == "public_url"
    # (fixed: urlsplit().username is "" here, so checking it alone let this through)


@pytest.mark.parametrize("url", [
    "wss://vps.example.com:99999/tunnel",
    "wss://vps.example.com:0/tunnel",
    "wss://vps.example.com:port/tunnel",
    "wss://vps example.com:7000/tunnel",
])
def test_public_url_rejects_unusable_authority(tmp_path: Path, url: str) -> None:
    exc = _error(tmp_path, f'public_url: "{url}"\n')
    assert exc.key == "public_url"


# --- public-key clients ---------------------------------------------------------------------


def test_public_key_client(tmp_path: Path) -> None:
    _, public = generate_keypair()
    config = _load(tmp_path, f"clients:\n  alice:\n    public_key: {public}\n"
                             "    ports: [\"6000-6009\"]\n")
    entry = config.clients["alice"]
    assert entry.public_key == public
    assert entry.token is None
    assert entry.ports == PortSet([(6000, 6009)])
    assert entry.source == str(tmp_path / "server.yaml")


def test_public_key_is_canonicalized(tmp_path: Path) -> None:
    _, public = generate_keypair()
    shouted = "ED25519:" + public.removeprefix("ed25519:")
    config = _load(tmp_path, f'clients:\n  alice:\n    public_key: "  {shouted}  "\n')
    assert config.clients["alice"].public_key == public


@pytest.mark.parametrize("other", [
    f"token: {TOKEN_A}",
    "token_env: SOME_VAR",
    "token_file: tok.txt",
])
def test_public_key_with_a_token_source_conflicts(tmp_path: Path, other: str) -> None:
    _, public = generate_keypair()
    exc = _error(tmp_path, f"clients:\n  alice:\n    public_key: {public}\n    {other}\n",
                 env={"SOME_VAR": TOKEN_A})
    assert "conflicting" in exc.message
    assert exc.key.startswith("clients.alice.")
    assert TOKEN_A not in str(exc)


def test_two_token_sources_conflict(tmp_path: Path) -> None:
    exc = _error(tmp_path, f"clients:\n  alice:\n    token: {TOKEN_A}\n    token_env: X\n",
                 env={"X": TOKEN_B})
    assert "conflicting" in exc.message
    assert TOKEN_A not in str(exc) and TOKEN_B not in str(exc)


@pytest.mark.parametrize("body", ["{}", "null", "{ports: [6000]}"])
def test_client_without_credential(tmp_path: Path, body: str) -> None:
    exc = _error(tmp_path, f"clients:\n  alice: {body}\n")
    assert exc.key.startswith("clients.alice")


def test_private_key_pasted_as_public_key_is_not_echoed(tmp_path: Path) -> None:
    private, _ = generate_keypair()
    secret = private.reveal()
    # A private key has the very same shape, so use a body that is not a key to force a
    # rejection, and one that is a private key of the wrong length.
    for value in (secret + "AA", secret[:-3], "ssh-ed25519 " + secret.removeprefix("ed25519:")):
        exc = _error(tmp_path, f'clients:\n  alice:\n    public_key: "{value}"\n')
        assert exc.key == "clients.alice.public_key"
        assert secret.removeprefix("ed25519:")[:20] not in str(exc)


@pytest.mark.parametrize("value", ["42", "true", "null", "[a]", '""'])
def test_public_key_wrong_type(tmp_path: Path, value: str) -> None:
    exc = _error(tmp_path, f"clients:\n  alice:\n    public_key: {value}\n")
    assert exc.key == "clients.alice.public_key"


def test_duplicate_public_keys_rejected(tmp_path: Path) -> None:
    _, public = generate_keypair()
    shouted = "ED25519:" + public.removeprefix("ed25519:")
    exc = _error(tmp_path, f"clients:\n  alice:\n    public_key: {public}\n"
                           f"  bob:\n    public_key: {shouted}\n")
    assert "same credential" in exc.message
    assert "alice" in exc.message and "bob" in str(exc)


def test_duplicate_tokens_rejected_without_echo(tmp_path: Path) -> None:
    exc = _error(tmp_path, f"clients:\n  alice:\n    token: {TOKEN_A}\n"
                           "  bob:\n    token_env: BOB\n", env={"BOB": TOKEN_A})
    assert "same credential" in exc.message
    assert TOKEN_A not in str(exc)


def test_mixed_credentials_coexist(tmp_path: Path) -> None:
    _, public = generate_keypair()
    config = _load(tmp_path, f"clients:\n  alice:\n    public_key: {public}\n"
                             f"  bob:\n    token: {TOKEN_B}\n")
    assert config.clients["alice"].public_key == public
    assert config.clients["bob"].token == Secret(TOKEN_B)
    assert config.clients["bob"].public_key is None


# --- clients_file ----------------------------------------------------------------------------


def _clients_yaml(tmp_path: Path, text: str, name: str = "clients.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_clients_file_merged_with_inline(tmp_path: Path) -> None:
    _, public = generate_keypair()
    file = _clients_yaml(tmp_path, f"# managed\nalice:\n  public_key: {public}\n"
                                   "  ports: [\"6000-6009\"]\n")
    config = _load(tmp_path, f"clients_file: clients.yaml\nclients:\n  bob:\n"
                             f"    token: {TOKEN_B}\n")
    assert set(config.clients) == {"alice", "bob"}
    assert config.clients_file == file
    assert config.clients["alice"].source == str(file)
    assert config.clients["bob"].source == str(tmp_path / "server.yaml")
    # bob has no ports of his own: alice's reservation is taken out of his share.
    assert config.client_ports("bob") == PortSet([(6010, 6099)])
    assert config.client_ports("alice") == PortSet([(6000, 6009)])


def test_clients_file_missing_means_no_clients(tmp_path: Path) -> None:
    config = _load(tmp_path, "clients_file: nowhere/clients.yaml\n")
    assert dict(config.clients) == {}
    assert config.clients_file == tmp_path / "nowhere" / "clients.yaml"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n", "null\n"])
def test_clients_file_empty(tmp_path: Path, text: str) -> None:
    _clients_yaml(tmp_path, text)
    assert dict(_load(tmp_path, "clients_file: clients.yaml\n").clients) == {}


def test_clients_file_absent_key(tmp_path: Path) -> None:
    assert _load(tmp_path).clients_file is None


def test_clients_file_name_in_both_places(tmp_path: Path) -> None:
    _, public = generate_keypair()
    file = _clients_yaml(tmp_path, f"alice:\n  public_key: {public}\n")
    exc = _error(tmp_path, f"clients_file: clients.yaml\nclients:\n  alice:\n"
                           f"    token: {TOKEN_A}\n")
    assert exc.source == str(file)
    assert exc.key == "alice"
    assert str(file) in str(exc) and "alice" in str(exc)
    assert TOKEN_A not in str(exc)


def test_clients_file_relative_token_file_is_relative_to_clients_file(tmp_path: Path) -> None:
    sub = tmp_path / "managed"
    _clients_yaml(sub, "carol:\n  token_file: carol.token\n")
    (sub / "carol.token").write_text(TOKEN_A + "\n")
    (sub / "carol.token").chmod(0o600)
    config = _load(tmp_path, "clients_file: managed/clients.yaml\n")
    assert config.clients["carol"].token == Secret(TOKEN_A)


def test_clients_file_duplicate_credential_across_files(tmp_path: Path) -> None:
    _, public = generate_keypair()
    _clients_yaml(tmp_path, f"alice:\n  public_key: {public}\n")
    exc = _error(tmp_path, f"clients_file: clients.yaml\nclients:\n  bob:\n"
                           f"    public_key: {public}\n")
    assert "same credential" in exc.message


def test_clients_file_ports_overlap_with_inline(tmp_path: Path) -> None:
    _, public = generate_keypair()
    _clients_yaml(tmp_path, f"alice:\n  public_key: {public}\n  ports: [\"6005-6010\"]\n")
    exc = _error(tmp_path, f"clients_file: clients.yaml\nclients:\n  bob:\n"
                           f"    token: {TOKEN_B}\n    ports: [\"6000-6005\"]\n")
    assert "overlap" in exc.message


def test_clients_file_ports_outside_relay(tmp_path: Path) -> None:
    _, public = generate_keypair()
    _clients_yaml(tmp_path, f"alice:\n  public_key: {public}\n  ports: [7000]\n")
    exc = _error(tmp_path, "clients_file: clients.yaml\n")
    assert "not in the relay's ports" in exc.message


@pytest.mark.parametrize(("text", "key_part"), [
    ("- alice\n", ""),
    ("alice: {public_key: nope}\n", "alice.public_key"),
    ("'bad name': {token: token-a-value-000000000001}\n", "bad name"),
    ("alice: {token: short}\n", "alice.token"),
    ("alice: {public_key: x, extra: 1}\n", "alice.extra"),
])
def test_clients_file_errors_name_the_clients_file(tmp_path: Path, text: str,
                                                   key_part: str) -> None:
    file = _clients_yaml(tmp_path, text)
    exc = _error(tmp_path, "clients_file: clients.yaml\n")
    assert exc.source == str(file)
    assert key_part in exc.key
    assert "token-a-value" not in str(exc)


def test_clients_file_wrong_type(tmp_path: Path) -> None:
    exc = _error(tmp_path, "clients_file: [clients.yaml]\n")
    assert exc.key == "clients_file"


def test_load_clients_file_directly(tmp_path: Path) -> None:
    _, public = generate_keypair()
    assert load_clients_file(tmp_path / "missing.yaml", {}) == {}
    file = _clients_yaml(tmp_path, f"alice:\n  public_key: {public}\n"
                                   "bob:\n  token_env: BOB\n  ports: [6001]\n")
    clients = load_clients_file(file, {"BOB": TOKEN_B})
    assert clients == {
        "alice": ClientEntry("alice", None, None, public_key=public),
        "bob": ClientEntry("bob", Secret(TOKEN_B), PortSet([(6001, 6001)])),
    }
    assert {entry.source for entry in clients.values()} == {str(file)}


def test_config_dir_recorded(tmp_path: Path) -> None:
    assert _load(tmp_path).config_dir == tmp_path
