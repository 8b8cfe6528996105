"""Relay config loading: strict YAML, typed validation, and errors users can act on."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest

from tunnel.common.config.yamlsafe import (
    MAX_CONFIG_BYTES,
    load_yaml_document_text,
    load_yaml_file,
    load_yaml_text,
)
from tunnel.common.errors import ConfigError
from tunnel.common.proto.portset import PortSet
from tunnel.common.proto.secret import Secret
from tunnel.server.config import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_PATH,
    ClientEntry,
    ServerConfig,
    load_server_config,
    parse_server_config,
)

FIXTURES = Path(__file__).parent / "fixtures" / "config"
VALID = sorted((FIXTURES / "valid").glob("*.yaml"))
INVALID = sorted((FIXTURES / "invalid").glob("*.yaml"))
LAPTOP_TOKEN = "env-laptop-token-value-0001"
ENV = {"TUNNEL_TEST_LAPTOP_TOKEN": LAPTOP_TOKEN}
_TOKEN_LINE = re.compile(r"^\s*token:\s*[\"']?([^\"'\s#]+)", re.MULTILINE)


def _expectation(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} lacks '# expect:' on line 1"
    return first.removeprefix("# expect: ")


def _write(tmp_path: Path, text: str, name: str = "server.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- fixtures --------------------------------------------------------------------------


def test_fixture_sets_are_present() -> None:
    assert len(VALID) >= 3
    assert len(INVALID) >= 19


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_fixture_loads(path: Path) -> None:
    config = load_server_config(path, env=ENV)
    assert isinstance(config, ServerConfig)
    assert config.source == str(path)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_fixture_is_rejected(path: Path) -> None:
    expected = _expectation(path)
    with pytest.raises(ConfigError) as info:
        load_server_config(path, env=ENV)
    message = str(info.value)
    assert path.name in message
    assert expected in message
    for token in [*_TOKEN_LINE.findall(path.read_text()), LAPTOP_TOKEN]:
        assert token not in message


def test_full_fixture_values() -> None:
    path = FIXTURES / "valid" / "full.yaml"
    config = load_server_config(path, env=ENV)
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 0)
    assert config.path == "/relay/v1"
    assert config.public_host == "relay.example.com"
    assert config.ports == PortSet([(6000, 6099), (7000, 7000), (8080, 8080)])
    assert config.state_dir == path.parent.absolute() / "state"
    assert config.heartbeat_interval == 5.0
    assert config.heartbeat_timeout == 12.5
    assert config.log_level == "debug"
    assert set(config.clients) == {"gpu-box-1", "laptop.home", "ci_runner"}
    gpu = config.clients["gpu-box-1"]
    assert gpu == ClientEntry("gpu-box-1", Secret("full-yaml-token-gpu-box-1"),
                              PortSet([(6000, 6009), (7000, 7000)]))
    assert config.clients["laptop.home"].token == Secret(LAPTOP_TOKEN)
    assert config.clients["laptop.home"].ports is None


def test_minimal_fixture_defaults() -> None:
    config = load_server_config(FIXTURES / "valid" / "minimal.yaml", env={})
    assert config.path == DEFAULT_PATH
    assert config.public_host == "0.0.0.0"
    assert config.heartbeat_interval == DEFAULT_HEARTBEAT_INTERVAL
    assert config.heartbeat_timeout == DEFAULT_HEARTBEAT_TIMEOUT
    assert config.log_level == "info"
    assert config.state_dir.name == "tunnel-state"
    assert config.clients == {}


def test_ipv6_listen() -> None:
    config = load_server_config(FIXTURES / "valid" / "ipv6.yaml", env={})
    assert (config.listen_host, config.listen_port) == ("::1", 7000)


def test_client_ports_reserves_other_clients_ranges() -> None:
    config = load_server_config(FIXTURES / "valid" / "full.yaml", env=ENV)
    assert config.client_ports("gpu-box-1") == PortSet([(6000, 6009), (7000, 7000)])
    assert config.client_ports("laptop.home") == PortSet([(6020, 6099), (8080, 8080)])
    with pytest.raises(KeyError):
        config.client_ports("nobody")


def test_repr_hides_tokens() -> None:
    config = load_server_config(FIXTURES / "valid" / "full.yaml", env=ENV)
    text = repr(config)
    for token in ("full-yaml-token-gpu-box-1", "full-yaml-token-ci-runner", LAPTOP_TOKEN):
        assert token not in text
    assert "Secret('***')" in text


def test_env_token_too_short_names_variable_not_value() -> None:
    path = FIXTURES / "valid" / "full.yaml"
    with pytest.raises(ConfigError) as info:
        load_server_config(path, env={"TUNNEL_TEST_LAPTOP_TOKEN": "short-secret"})
    assert "TUNNEL_TEST_LAPTOP_TOKEN" in str(info.value)
    assert "short-secret" not in str(info.value)


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNNEL_TEST_LAPTOP_TOKEN", LAPTOP_TOKEN)
    config = load_server_config(FIXTURES / "valid" / "full.yaml")
    assert config.clients["laptop.home"].token == Secret(LAPTOP_TOKEN)


def test_parse_server_config_directly(tmp_path: Path) -> None:
    data = {"listen": "0.0.0.0:7000", "ports": [6000], "state_dir": "/var/lib/tunnel"}
    config = parse_server_config(data, "inline", tmp_path, {})
    assert config.state_dir == Path("/var/lib/tunnel")
    assert config.source == "inline"


# --- token_file --------------------------------------------------------------------------

_TOKEN_FILE_CONFIG = """\
listen: "0.0.0.0:7000"
ports: [6000]
clients:
  gpu1:
    token_file: secrets/gpu1.token
"""


def test_token_file_relative_to_config_dir(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "secrets").mkdir()
    token_path = tmp_path / "secrets" / "gpu1.token"
    token_path.write_text("file-token-value-00000001\n")
    token_path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="tunnel.config"):
        config = load_server_config(_write(tmp_path, _TOKEN_FILE_CONFIG), env={})
    assert config.clients["gpu1"].token == Secret("file-token-value-00000001")
    assert not caplog.records


def test_token_file_readable_by_others_warns(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "secrets").mkdir()
    token_path = tmp_path / "secrets" / "gpu1.token"
    token_path.write_text("file-token-value-00000001\n")
    token_path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="tunnel.config"):
        load_server_config(_write(tmp_path, _TOKEN_FILE_CONFIG), env={})
    assert any("readable by group or others" in r.getMessage() for r in caplog.records)
    assert all("file-token-value" not in r.getMessage() for r in caplog.records)


def test_token_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.yaml: clients\.gpu1\.token_file: "
                                          r"cannot read token file"):
        load_server_config(_write(tmp_path, _TOKEN_FILE_CONFIG), env={})


def test_token_file_too_short(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "gpu1.token").write_text("tiny-secret\n")
    with pytest.raises(ConfigError, match="too short") as info:
        load_server_config(_write(tmp_path, _TOKEN_FILE_CONFIG), env={})
    assert "tiny-secret" not in str(info.value)


# --- strict YAML ---------------------------------------------------------------------------


def test_size_cap_fails_fast(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with path.open("w") as handle:
        handle.write("listen: '0.0.0.0:7000'\nports: [6000]\n")
        handle.write("# padding\n" * (MAX_CONFIG_BYTES // 10 + 10))
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"huge\.yaml: .*limited to 1048576 bytes"):
        load_server_config(path, env={})
    assert time.monotonic() - start < 0.5


def test_size_cap_applies_to_text() -> None:
    start = time.monotonic()
    with pytest.raises(ConfigError, match="limited to"):
        load_yaml_text("a: " + "x" * MAX_CONFIG_BYTES, "big.yaml")
    assert time.monotonic() - start < 0.5


def test_yaml_scalars_keep_safe_load_meaning() -> None:
    data = load_yaml_text("a: on\nb: 8080\nc: '0x1F90'\nd: ~\ne: 1.5\nf: no\n", "t.yaml")
    assert data == {"a": True, "b": 8080, "c": "0x1F90", "d": None, "e": 1.5, "f": False}


@pytest.mark.parametrize("text", ["0x1F90", "010", "0b1010", "1_000", "8888:30"])
def test_yaml_integers_must_be_plain_decimal(text: str) -> None:
    """YAML 1.1 reads these as ints (8080, 8, 15, 1000, base 60): type traps for ports."""
    with pytest.raises(ConfigError, match="plain decimal"):
        load_yaml_text(f"a: {text}\n", "t.yaml")


def test_yaml_lines_are_recorded() -> None:
    doc = load_yaml_document_text("a: 1\nb:\n  c: [1,\n    2]\n", "t.yaml")
    assert doc.line_of("a") == 1
    assert doc.line_of("b.c") == 3
    assert doc.line_of("b.c[1]") == 4
    assert doc.line_of("zzz") is None


@pytest.mark.parametrize(("text", "expected"), [
    ("a: !!set {x}", "tag !!set is not allowed"),
    ("a: !!binary aGVsbG8=", "tag !!binary is not allowed"),
    ("a: !custom 1", "tag !custom is not allowed"),
    ("<<: {a: 1}", "merge keys (<<) are not allowed"),
    ("? [1]\n: 2", "mapping keys must be plain scalars"),
    ("a: 1\n---\nb: 2", "invalid YAML at line 2, column 1"),
    ("a: " + "[" * 100 + "]" * 100, "nesting deeper than"),
    ("a: \x01", "unacceptable character"),
    ("a: !!int nope", "a: integer 'nope' must be written in plain decimal (line 1, column 4)"),
    ("&x a: 1", "anchors and aliases are not allowed"),
])
def test_yaml_rejections(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_yaml_text(text, "t.yaml")
    assert str(info.value).startswith("t.yaml")
    assert expected in str(info.value)


def test_empty_document_is_not_a_mapping(tmp_path: Path) -> None:
    assert load_yaml_file(_write(tmp_path, "")) is None
    with pytest.raises(ConfigError, match="expected a mapping of settings at the top level"):
        load_server_config(_write(tmp_path, "# nothing yet\n"), env={})


def test_missing_file_and_bad_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read file"):
        load_server_config(tmp_path / "absent.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"listen: \xff\n")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_server_config(bad, env={})


# --- B-11: every rejection names file, line and column ----------------------------------


@pytest.mark.parametrize(("body", "where"), [
    ("ports: [on]", "(line 2, column 9)"),
    ("ports: [08080]", "(line 2, column 9)"),
    ("ports: [0x1F90]", "(line 2, column 9)"),
    ("ports: [8080.0]", "(line 2, column 9)"),
    ("ports: !!python/object:os.system [8080]", "(line 2, column 8)"),
    ("ports: [8080]\nports: [8081]", "duplicate key (line 3, column 1, first at line 2)"),
    ("ports: &p [8080]\nother: *p", "(line 2, column 8)"),
    ("ports: [8080", "at line 3, column 1"),
])
def test_B11_config_errors_give_line_and_column(tmp_path: Path, body: str, where: str) -> None:
    path = _write(tmp_path, f'listen: "127.0.0.1:7000"\n{body}\n')
    with pytest.raises(ConfigError) as info:
        load_server_config(path, env={})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert where in message


def test_B11_control_character_and_bad_utf8_give_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"at line 2, column 4: unacceptable character"):
        load_yaml_text("a: 1\nb: \x01", "t.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"a: 1\nlisten: \xff\n")
    with pytest.raises(ConfigError, match=r"not valid UTF-8 at line 2, column 9 \(byte 13\)"):
        load_server_config(bad, env={})


def test_B11_oversized_file_is_refused_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as handle:  # sparse: 100 MiB without writing them
        handle.truncate(100 * 1024 * 1024)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="config files are limited to 1048576 bytes"):
        load_server_config(big, env={})
    assert time.monotonic() - started < 1.0


def test_open_rate_defaults_and_override(tmp_path: Path) -> None:
    base = 'listen: "0.0.0.0:7000"\nports: [6000]\n'
    default = load_server_config(_write(tmp_path, base), env={})
    assert (default.opens_per_source, default.opens_per_port) == (200.0, 2000.0)
    raised = load_server_config(_write(tmp_path, base + "open_rate: {per_source: 5000}\n"),
                                env={})
    assert (raised.opens_per_source, raised.opens_per_port) == (5000.0, 2000.0)
