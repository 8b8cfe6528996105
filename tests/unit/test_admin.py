"""Relay administration: init, add-client, remove-client, list-clients and --ports parsing."""

from __future__ import annotations

import asyncio
import re
import stat
from pathlib import Path

import pytest
import yaml

from tunnel.common.config.credentials import JoinInfo, decode_join, public_key_of
from tunnel.common.errors import ConfigError
from tunnel.common.proto.portset import PortSet
from tunnel.server.admin import main, parse_port_spec
from tunnel.server.app import LEASE_DB_NAME
from tunnel.server.config import load_server_config
from tunnel.server.leases import Lease, SqliteLeaseStore
from tunnel.server.tls import cert_file_fingerprint

PUBLIC_URL = "wss://vps.example.com:7000/tunnel"
INLINE_TOKEN = "inline-token-value-0000001"
_JOIN = re.compile(r"tunnel1_[A-Za-z0-9_-]+")
_FINGERPRINT_LINE = re.compile(r"^fingerprint: (sha256:[0-9a-f]{64})$", re.MULTILINE)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TUNNEL_SERVER_CONFIG", raising=False)


@pytest.fixture
def relay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """An initialised relay directory; its init output is discarded."""
    directory = tmp_path / "relay"
    assert main(["init", "--public-host", "vps.example.com", "--dir", str(directory),
                 "--ports", "6000-6099"]) == 0
    capsys.readouterr()
    return directory


def _config(directory: Path) -> str:
    return str(directory / "server.yaml")


def _add(directory: Path, capsys: pytest.CaptureFixture[str], name: str,
         *extra: str) -> JoinInfo:
    assert main(["add-client", name, "--config", _config(directory), *extra]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    joins = set(_JOIN.findall(out))
    assert len(joins) == 1, out
    return decode_join(joins.pop())


def _clients(directory: Path) -> dict[str, dict[str, object]]:
    data = yaml.safe_load((directory / "clients.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _cert_fingerprint(directory: Path) -> str:
    return cert_file_fingerprint(directory / "state" / "tls" / "cert.pem")


# --- init --------------------------------------------------------------------------------


def test_init_writes_private_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "relay"
    assert main(["init", "--public-host", "vps.example.com", "--dir", str(directory)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for name in ("server.yaml", "clients.yaml", "admin-password"):
        assert _mode(directory / name) == 0o600, name
    assert _mode(directory) == 0o700
    tls = directory / "state" / "tls"
    assert _mode(tls / "key.pem") == 0o600
    assert (tls / "cert.pem").is_file()
    assert _mode(tls) == 0o700
    password = (directory / "admin-password").read_text().strip()
    assert len(password) >= 16
    assert password not in out
    assert b"PRIVATE KEY" not in (tls / "cert.pem").read_bytes()
    match = _FINGERPRINT_LINE.search(out)
    assert match is not None, out
    assert match.group(1) == cert_file_fingerprint(tls / "cert.pem")


def test_init_config_loads(relay: Path) -> None:
    config = load_server_config(relay / "server.yaml", {})
    assert config.public_url == PUBLIC_URL
    assert config.tls.mode == "auto"
    assert config.clients_file == relay / "clients.yaml"
    assert dict(config.clients) == {}
    assert config.ports == PortSet([(6000, 6099)])
    assert config.state_dir == relay / "state"
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 7000)


@pytest.mark.parametrize(("args", "url", "ports"), [
    (["--public-host", "2001:db8::1", "--listen", "[::]:7443"],
     "wss://[2001:db8::1]:7443/tunnel", PortSet([(6000, 6999)])),
    (["--public-host", "203.0.113.5", "--ports", "6000,6005,7000-7010"],
     "wss://203.0.113.5:7000/tunnel", PortSet([(6000, 6000), (6005, 6005), (7000, 7010)])),
])
def test_init_options(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                      url: str, ports: PortSet) -> None:
    directory = tmp_path / "relay"
    assert main(["init", "--dir", str(directory), *args]) == 0
    capsys.readouterr()
    config = load_server_config(directory / "server.yaml", {})
    assert config.public_url == url
    assert config.ports == ports


def test_init_default_dir_is_under_xdg(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--public-host", "vps.example.com"]) == 0
    capsys.readouterr()
    directory = tmp_path / "xdg" / "tunnel-server"
    assert (directory / "server.yaml").is_file()
    # add-client finds it without --config.
    assert main(["add-client", "alice"]) == 0
    out, _ = capsys.readouterr()
    assert decode_join(_JOIN.findall(out)[0]).name == "alice"
    assert "alice" in _clients(directory)


def test_init_twice_without_force(relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (relay / "server.yaml").read_text()
    assert main(["init", "--public-host", "other.example.com", "--dir", str(relay)]) == 2
    out, err = capsys.readouterr()
    assert "--force" in err
    assert "fingerprint" not in out
    assert (relay / "server.yaml").read_text() == before


def test_init_force_keeps_tls_key_password_and_clients(
        relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = (relay / "state" / "tls" / "key.pem").read_bytes()
    fingerprint = _cert_fingerprint(relay)
    password = (relay / "admin-password").read_text()
    _add(relay, capsys, "alice", "--ports", "6000-6009")
    assert main(["init", "--public-host", "new.example.com", "--dir", str(relay),
                 "--ports", "6000-6099", "--force"]) == 0
    out, _ = capsys.readouterr()
    match = _FINGERPRINT_LINE.search(out)
    assert match is not None and match.group(1) == fingerprint
    assert (relay / "state" / "tls" / "key.pem").read_bytes() == key
    assert _cert_fingerprint(relay) == fingerprint
    assert (relay / "admin-password").read_text() == password
    config = load_server_config(relay / "server.yaml", {})
    assert config.public_url == "wss://new.example.com:7000/tunnel"
    assert set(config.clients) == {"alice"}


def test_init_force_failure_keeps_a_loadable_config(
        relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _add(relay, capsys, "alice", "--ports", "6000-6009")
    before = (relay / "server.yaml").read_text()
    assert main(["init", "--public-host", "vps.example.com", "--dir", str(relay),
                 "--ports", "6050-6099", "--force"]) == 2
    capsys.readouterr()
    assert (relay / "server.yaml").read_text() == before


def test_init_with_half_tls_state_exits_2(relay: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (relay / "state" / "tls" / "cert.pem").unlink()
    assert main(["init", "--public-host", "vps.example.com", "--dir", str(relay),
                 "--force"]) == 2
    _, err = capsys.readouterr()
    assert "cert.pem" in err


# --- add-client --------------------------------------------------------------------------


def test_add_client_join_string(relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = _add(relay, capsys, "alice")
    assert info.server_url == PUBLIC_URL
    assert info.fingerprint == _cert_fingerprint(relay)
    assert info.name == "alice"
    stored = _clients(relay)["alice"]
    assert stored == {"public_key": public_key_of(info.private_key)}
    config = load_server_config(relay / "server.yaml", {})
    assert config.clients["alice"].public_key == public_key_of(info.private_key)
    assert config.clients["alice"].ports is None
    assert _mode(relay / "clients.yaml") == 0o600
    secret = info.private_key.reveal()
    for name in ("clients.yaml", "server.yaml"):
        text = (relay / name).read_text()
        assert secret not in text and secret.removeprefix("ed25519:") not in text
        assert "tunnel1_" not in text


def test_add_client_with_ports(relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _add(relay, capsys, "alice", "--ports", "6000-6009")
    _add(relay, capsys, "bob", "--ports", "6010,6012,6020-6029")
    _add(relay, capsys, "carol")
    assert _clients(relay)["alice"]["ports"] == ["6000-6009"]
    assert _clients(relay)["bob"]["ports"] == [6010, 6012, "6020-6029"]
    config = load_server_config(relay / "server.yaml", {})
    assert config.client_ports("alice") == PortSet([(6000, 6009)])
    assert config.client_ports("carol") == PortSet(
        [(6011, 6011), (6013, 6019), (6030, 6099)])


def test_each_client_gets_its_own_key(relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = _add(relay, capsys, "alice"), _add(relay, capsys, "bob")
    assert first.private_key != second.private_key
    stored = _clients(relay)
    assert stored["alice"]["public_key"] != stored["bob"]["public_key"]


@pytest.mark.parametrize("ports", ["6005-6010", "6009", "6000-6099"])
def test_add_client_overlapping_ports_rolls_back(relay: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 ports: str) -> None:
    _add(relay, capsys, "alice", "--ports", "6000-6009")
    before = (relay / "clients.yaml").read_bytes()
    assert main(["add-client", "bob", "--ports", ports, "--config", _config(relay)]) == 2
    out, err = capsys.readouterr()
    assert "overlap" in err
    assert "tunnel1_" not in out + err
    assert (relay / "clients.yaml").read_bytes() == before
    assert _mode(relay / "clients.yaml") == 0o600
    assert [p.name for p in relay.iterdir() if p.name.startswith(".")] == []


def test_add_client_ports_outside_relay_rolls_back(relay: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    before = (relay / "clients.yaml").read_bytes()
    assert main(["add-client", "bob", "--ports", "7000-7009", "--config", _config(relay)]) == 2
    out, err = capsys.readouterr()
    assert "tunnel1_" not in out + err
    assert (relay / "clients.yaml").read_bytes() == before


def test_add_client_existing_name(relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _add(relay, capsys, "alice")
    before = (relay / "clients.yaml").read_bytes()
    assert main(["add-client", "alice", "--config", _config(relay)]) == 2
    out, err = capsys.readouterr()
    assert "exists" in err
    assert "tunnel1_" not in out
    assert (relay / "clients.yaml").read_bytes() == before


def _add_inline_client(relay: Path, name: str = "inline") -> None:
    with (relay / "server.yaml").open("a") as handle:
        handle.write(f"clients:\n  {name}:\n    token: {INLINE_TOKEN}\n")


def test_add_client_name_of_inline_client(relay: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    _add_inline_client(relay)
    assert main(["add-client", "inline", "--config", _config(relay)]) == 2
    capsys.readouterr()
    assert _clients(relay) == {}


@pytest.mark.parametrize("name", ["", "_bad", ".bad", "bad name", "bad/name", "a" * 64,
                                  "caf\u00e9", "bad\nname"])
def test_add_client_invalid_name(relay: Path, capsys: pytest.CaptureFixture[str],
                                 name: str) -> None:
    before = (relay / "clients.yaml").read_bytes()
    assert main(["add-client", name, "--config", _config(relay)]) == 2
    out, err = capsys.readouterr()
    assert "tunnel1_" not in out
    assert "names are" in err
    assert (relay / "clients.yaml").read_bytes() == before


def test_add_client_longest_valid_name(relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = "a" + "b.c_d-" * 10 + "xy"
    assert len(name) == 63
    assert _add(relay, capsys, name).name == name


@pytest.mark.parametrize("ports", ["abc", "0-5", "7000-6000"])
def test_add_client_bad_ports_flag(relay: Path, capsys: pytest.CaptureFixture[str],
                                   ports: str) -> None:
    assert main(["add-client", "bob", "--ports", ports, "--config", _config(relay)]) == 2
    out, err = capsys.readouterr()
    assert "--ports" in err
    assert "tunnel1_" not in out
    assert _clients(relay) == {}


def test_add_client_needs_public_url(relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = relay / "server.yaml"
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if not line.startswith("public_url:")))
    assert main(["add-client", "alice", "--config", str(path)]) == 2
    _, err = capsys.readouterr()
    assert "public_url" in err
    assert _clients(relay) == {}


def test_add_client_needs_clients_file(relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = relay / "server.yaml"
    path.write_text(path.read_text().replace("clients_file: clients.yaml\n", ""))
    assert main(["add-client", "alice", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "clients_file" in err
    assert "tunnel1_" not in out


def test_add_client_tls_off_has_no_pin(relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = relay / "server.yaml"
    path.write_text(re.sub(r"^tls: auto.*$", "tls: off", path.read_text(), flags=re.M))
    assert _add(relay, capsys, "alice").fingerprint is None


def test_add_client_tls_files_pins_that_cert(relay: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = relay / "server.yaml"
    files = "tls:\n  cert: state/tls/cert.pem\n  key: state/tls/key.pem"
    path.write_text(re.sub(r"^tls: auto.*$", files, path.read_text(), flags=re.M))
    assert _add(relay, capsys, "alice").fingerprint == _cert_fingerprint(relay)


def test_add_client_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["add-client", "alice", "--config", str(tmp_path / "nope.yaml")]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("tunnel-server add-client: ")


# --- remove-client -----------------------------------------------------------------------


def test_remove_client(relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _add(relay, capsys, "alice", "--ports", "6000-6009")
    _add(relay, capsys, "bob")
    assert main(["remove-client", "alice", "--config", _config(relay)]) == 0
    capsys.readouterr()
    assert set(_clients(relay)) == {"bob"}
    config = load_server_config(relay / "server.yaml", {})
    assert set(config.clients) == {"bob"}
    assert config.client_ports("bob") == PortSet([(6000, 6099)])
    assert _mode(relay / "clients.yaml") == 0o600
    # The name is free again.
    _add(relay, capsys, "alice")


def test_remove_last_client_leaves_empty_mapping(relay: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _add(relay, capsys, "alice")
    assert main(["remove-client", "alice", "--config", _config(relay)]) == 0
    capsys.readouterr()
    assert yaml.safe_load((relay / "clients.yaml").read_text()) == {}
    assert dict(load_server_config(relay / "server.yaml", {}).clients) == {}


def test_remove_unknown_client(relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _add(relay, capsys, "alice")
    before = (relay / "clients.yaml").read_bytes()
    assert main(["remove-client", "nobody", "--config", _config(relay)]) == 2
    _, err = capsys.readouterr()
    assert "no such client" in err
    assert (relay / "clients.yaml").read_bytes() == before


def test_remove_inline_client_is_refused(relay: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _add_inline_client(relay)
    server_before = (relay / "server.yaml").read_bytes()
    assert main(["remove-client", "inline", "--config", _config(relay)]) == 2
    _, err = capsys.readouterr()
    assert "server config" in err
    assert INLINE_TOKEN not in err
    assert (relay / "server.yaml").read_bytes() == server_before
    assert "inline" in load_server_config(relay / "server.yaml", {}).clients


# --- list-clients ------------------------------------------------------------------------


def test_list_clients(relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alice = _add(relay, capsys, "alice", "--ports", "6000-6009")
    bob = _add(relay, capsys, "bob")
    _add_inline_client(relay)
    assert main(["list-clients", "--config", _config(relay)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert set(rows) == {"alice", "bob", "inline"}
    assert rows["alice"][1:3] == ["key", "6000-6009"]
    assert rows["bob"][1] == "key"
    assert rows["inline"][1] == "token"
    assert "tunnel1_" not in out
    assert INLINE_TOKEN not in out
    for info in (alice, bob):
        assert info.private_key.reveal().removeprefix("ed25519:") not in out
        assert public_key_of(info.private_key).removeprefix("ed25519:") not in out


def test_list_clients_empty(relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list-clients", "--config", _config(relay)]) == 0
    out, _ = capsys.readouterr()
    assert len(out.splitlines()) == 1
    assert out.startswith("NAME")


def test_list_clients_corrupt_lease_db_exits_2(relay: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (relay / "state" / "leases.sqlite3").write_bytes(b"this is not a sqlite database" * 100)
    assert main(["list-clients", "--config", _config(relay)]) == 2
    _, err = capsys.readouterr()
    assert "leases.sqlite3" in err


# --- parse_port_spec ---------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("6000-6009", [(6000, 6009)]),
    ("6000,6005,7000-7010", [(6000, 6000), (6005, 6005), (7000, 7010)]),
    ("6000", [(6000, 6000)]),
    ("1-65535", [(1, 65535)]),
    ("6000-6000", [(6000, 6000)]),
    ("6000, 6001", [(6000, 6001)]),
])
def test_parse_port_spec(text: str, expected: list[tuple[int, int]]) -> None:
    assert parse_port_spec(text) == PortSet(expected)


@pytest.mark.parametrize("text", ["abc", "0-5", "7000-6000", "70000", "", "6000,", "-5",
                                  "6000-6005-6010", "6000-70000", "0"])
def test_parse_port_spec_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_port_spec(text)
    assert info.value.source == "--ports"


@pytest.mark.parametrize("text", ["6000-", "6_000", "+6000", "6000-6_009"])
def test_parse_port_spec_rejects_lenient_int_spellings(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_port_spec(text)


def _leases_in(directory: Path, leases: list[Lease] | None = None) -> list[Lease]:
    """The relay's lease rows (written first when ``leases`` is given)."""
    config = load_server_config(directory / "server.yaml", {})

    async def run() -> list[Lease]:
        async with SqliteLeaseStore(Path(config.state_dir) / LEASE_DB_NAME) as store:
            for lease in leases or []:
                assert await store.claim(lease, None)
            return await store.load()

    return asyncio.run(run())


def test_remove_client_releases_its_leases(relay: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _add(relay, capsys, "alice")
    _add(relay, capsys, "bob")
    _leases_in(relay, [Lease(6001, "alice", "fixed", "127.0.0.1:22", 1.0, 1.0),
                       Lease(6002, "bob", "auto", "127.0.0.1:80", 1.0, 1.0)])
    assert main(["remove-client", "alice", "--config", _config(relay)]) == 0
    out, _ = capsys.readouterr()
    assert "released ports: 6001" in out
    assert [lease.client for lease in _leases_in(relay)] == ["bob"]


def test_remove_client_releases_leases_of_a_hand_removed_client(
        relay: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A client dropped from clients.yaml by hand keeps its ports until remove-client."""
    _add(relay, capsys, "alice")
    _leases_in(relay, [Lease(6001, "alice", "fixed", "127.0.0.1:22", 1.0, 1.0)])
    (relay / "clients.yaml").write_text("{}\n", encoding="utf-8")
    assert main(["remove-client", "alice", "--config", _config(relay)]) == 0
    capsys.readouterr()
    assert _leases_in(relay) == []
    assert yaml.safe_load((relay / "clients.yaml").read_text()) == {}
