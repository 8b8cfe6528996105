"""Typed, strictly validated relay configuration.

A relay config is edited by hand, rarely, and mistakes in it are security relevant (a typo'd
key that silently falls back to a default, a ``ports`` entry YAML read as a boolean). So
everything not explicitly allowed is an error, and every error names the file, the dotted
key path and what would have been accepted. Token values never appear in messages or reprs.

The token helpers (:func:`resolve_token`) are shared with the client's settings file.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from types import MappingProxyType

from tunnel.common.errors import ConfigError
from tunnel.common.portset import MAX_PORT, MIN_PORT, PortSet
from tunnel.common.secret import Secret
from tunnel.common.yamlsafe import child_path, item_path, load_yaml_document_file

__all__ = [
    "CLIENT_NAME_PATTERN",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_LOG_LEVEL",
    "DEFAULT_PATH",
    "DEFAULT_PUBLIC_HOST",
    "DEFAULT_STATE_DIR",
    "LOG_LEVELS",
    "MAX_TOKEN_FILE_BYTES",
    "MIN_TOKEN_LENGTH",
    "ClientEntry",
    "ConfigContext",
    "ServerConfig",
    "describe_value",
    "load_server_config",
    "parse_server_config",
    "resolve_token",
]

log = logging.getLogger("tunnel.config")

DEFAULT_PATH = "/tunnel"
DEFAULT_PUBLIC_HOST = "0.0.0.0"
DEFAULT_STATE_DIR = "./tunnel-state"
DEFAULT_LOG_LEVEL = "info"
LOG_LEVELS = ("debug", "info", "warning", "error")
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_FILE_BYTES = 4096
"""A token file holds one line; refuse to slurp something that clearly is not one."""
CLIENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
DEFAULT_HEARTBEAT_INTERVAL = 10.0
DEFAULT_HEARTBEAT_TIMEOUT = 30.0

_CLIENT_NAME_RE = re.compile(CLIENT_NAME_PATTERN)
_PORT_RANGE_RE = re.compile(r"([0-9]+)-([0-9]+)", re.ASCII)
_PORT_EXPECTED = f'expected a port number {MIN_PORT}-{MAX_PORT} or a range "A-B"'
_LISTEN_EXPECTED = '"HOST:PORT", e.g. "0.0.0.0:7000" or "[::1]:7000"'
_TOKEN_KEYS = ("token", "token_env", "token_file")
_SERVER_KEYS = ("listen", "path", "public_host", "ports", "state_dir", "clients",
                "heartbeat_interval", "heartbeat_timeout", "log_level", "tls")
_CLIENT_KEYS = (*_TOKEN_KEYS, "ports")
_UNSAFE_PATH_CHARS = re.compile(r"[\s?#]")


def describe_value(value: object, *, secret: bool = False) -> str:
    """Name a YAML value the way a user would, e.g. ``boolean true`` or ``string "08080"``.

    ``secret=True`` names only the type, for values that may be (part of) a token.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean true" if value else "boolean false"
    kind = _kind(value)
    if secret or isinstance(value, list | dict):
        return kind
    if isinstance(value, str):
        return f'{kind} "{value}"'
    return f"{kind} {value}"


def _kind(value: object) -> str:
    if isinstance(value, str):
        return "string"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, date):
        return "date"
    return type(value).__name__


@dataclass(frozen=True)
class ConfigContext:
    """Where values come from: the file (for messages), its directory and key lines."""

    source: str
    base_dir: Path
    lines: Mapping[str, int]

    def error(self, key: str, message: str) -> ConfigError:
        line = self.lines.get(key)
        suffix = f" (line {line})" if line is not None else ""
        return ConfigError(self.source, key, message + suffix)

    def expect_mapping(self, value: object, key: str, what: str) -> Mapping[str, object]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected {what}, got {describe_value(value)}")
        for name in value:
            if not isinstance(name, str):
                raise self.error(key, f"keys must be strings, got {describe_value(name)}")
        return value

    def reject_unknown(self, data: Mapping[str, object], key: str,
                       allowed: tuple[str, ...]) -> None:
        for name in data:
            if name not in allowed:
                raise self.error(child_path(key, name),
                                 f"unknown key; allowed keys: {', '.join(allowed)}")

    def expect_str(self, value: object, key: str, what: str = "a string") -> str:
        if not isinstance(value, str):
            raise self.error(key, f"expected {what}, got {describe_value(value)}")
        return value


@dataclass(frozen=True)
class ClientEntry:
    """One client allowed to log in to the relay."""

    name: str
    token: Secret
    ports: PortSet | None
    """``None``: may use any relay port not reserved by another client's ``ports``."""


@dataclass(frozen=True)
class ServerConfig:
    """The validated relay configuration."""

    source: str
    listen_host: str
    listen_port: int
    path: str
    public_host: str
    ports: PortSet
    state_dir: Path
    clients: Mapping[str, ClientEntry]
    heartbeat_interval: float
    heartbeat_timeout: float
    log_level: str

    def client_ports(self, name: str) -> PortSet:
        """Ports ``name`` may claim: its own ``ports``, else relay ports nobody reserved.

        Raises KeyError for an unknown client.
        """
        entry = self.clients[name]
        if entry.ports is not None:
            return entry.ports
        reserved = PortSet(r for other in self.clients.values()
                           if other.name != name and other.ports is not None
                           for r in other.ports.ranges)
        return self.ports.difference(reserved)


# --- ports -------------------------------------------------------------------------------


def _port_range(ctx: ConfigContext, value: object, key: str) -> tuple[int, int]:
    """One ``ports`` item: an int (never a bool) or an exact ``"A-B"`` string."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not MIN_PORT <= value <= MAX_PORT:
            raise ctx.error(key, f"{_PORT_EXPECTED}, got {describe_value(value)} "
                                 f"(outside {MIN_PORT}-{MAX_PORT})")
        return value, value
    if not isinstance(value, str):
        raise ctx.error(key, f"{_PORT_EXPECTED}, got {describe_value(value)}")
    match = _PORT_RANGE_RE.fullmatch(value)
    if match is None:
        raise ctx.error(key, f"{_PORT_EXPECTED}, got {describe_value(value)} "
                             "(write single ports as unquoted numbers)")
    if any(part.startswith("0") for part in match.groups()):
        raise ctx.error(key, f"{_PORT_EXPECTED}, got {describe_value(value)} "
                             "(leading zeros are not allowed)")
    lo, hi = int(match.group(1)), int(match.group(2))
    if not (MIN_PORT <= lo <= MAX_PORT and MIN_PORT <= hi <= MAX_PORT):
        raise ctx.error(key, f"range {value} is outside {MIN_PORT}-{MAX_PORT}")
    if lo > hi:
        raise ctx.error(key, f"reversed range {value}: the start must not exceed the end")
    return lo, hi


def _port_set(ctx: ConfigContext, value: object, key: str) -> PortSet:
    if not isinstance(value, list):
        raise ctx.error(key, f'expected a list of ports and "A-B" ranges, '
                             f"got {describe_value(value)}")
    if not value:
        raise ctx.error(key, 'must not be empty; list ports and "A-B" ranges')
    return PortSet(_port_range(ctx, item, item_path(key, i)) for i, item in enumerate(value))


# --- tokens ------------------------------------------------------------------------------


def _check_token_length(ctx: ConfigContext, value: str, key: str, origin: str) -> Secret:
    if len(value) < MIN_TOKEN_LENGTH:
        raise ctx.error(key, f"{origin} is too short; tokens need at least "
                             f"{MIN_TOKEN_LENGTH} characters")
    return Secret(value)


def _token_from_env(ctx: ConfigContext, value: object, key: str,
                    env: Mapping[str, str]) -> Secret:
    name = ctx.expect_str(value, key, "the name of an environment variable")
    if name not in env:
        raise ctx.error(key, f"environment variable {name} is not set")
    return _check_token_length(ctx, env[name], key, f"the token in environment variable {name}")


def _warn_if_readable(path: Path) -> None:
    """Tokens are credentials; a group/world readable file leaks them to other users."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("token file %s is readable by group or others (mode %o); "
                    "run: chmod 600 %s", path, stat.S_IMODE(mode), path)


def _token_from_file(ctx: ConfigContext, value: object, key: str) -> Secret:
    raw_path = ctx.expect_str(value, key, "a file path")
    if not raw_path:
        raise ctx.error(key, "expected a file path, got an empty string")
    path = ctx.base_dir / raw_path
    try:
        if path.stat().st_size > MAX_TOKEN_FILE_BYTES:
            raise ctx.error(key, f"token file {path} is larger than "
                                 f"{MAX_TOKEN_FILE_BYTES} bytes")
        with path.open("rb") as handle:
            raw = handle.read(MAX_TOKEN_FILE_BYTES + 1)
        _warn_if_readable(path)
    except OSError as exc:
        raise ctx.error(key, f"cannot read token file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ctx.error(key, f"token file {path} is not valid UTF-8") from None
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise ctx.error(key, f"token file {path} is larger than {MAX_TOKEN_FILE_BYTES} bytes")
    return _check_token_length(ctx, text.rstrip("\r\n"), key, f"the token in {path}")


def resolve_token(ctx: ConfigContext, data: Mapping[str, object], key: str,
                  env: Mapping[str, str]) -> Secret:
    """The token of a mapping holding exactly one of ``token``, ``token_env``, ``token_file``.

    ``key`` is the mapping's own key path ("" for a top-level mapping).
    """
    given = [name for name in _TOKEN_KEYS if name in data]
    if not given:
        raise ctx.error(key, "missing token; set exactly one of token, token_env, token_file")
    if len(given) > 1:
        raise ctx.error(child_path(key, given[1]), f"conflicting token sources "
                        f"{' and '.join(given)}; set exactly one of token, token_env, token_file")
    name = given[0]
    sub = child_path(key, name)
    value = data[name]
    if name == "token_env":
        return _token_from_env(ctx, value, sub, env)
    if name == "token_file":
        return _token_from_file(ctx, value, sub)
    if not isinstance(value, str):
        raise ctx.error(sub, f"expected a string of at least {MIN_TOKEN_LENGTH} characters, "
                             f"got {describe_value(value, secret=True)}")
    return _check_token_length(ctx, value, sub, "the token")


# --- clients -----------------------------------------------------------------------------


def _client_entry(ctx: ConfigContext, name: object, value: object,
                  env: Mapping[str, str]) -> ClientEntry:
    if not isinstance(name, str) or not _CLIENT_NAME_RE.fullmatch(name):
        raise ctx.error(child_path("clients", str(name)),
                        f"invalid client name {describe_value(name)}; names are 1-63 "
                        "letters, digits, '.', '_' or '-', starting with a letter or digit")
    key = child_path("clients", name)
    if value is None:
        raise ctx.error(key, "expected a mapping with one of token, token_env, token_file")
    data = ctx.expect_mapping(value, key, "a mapping with token/token_env/token_file and ports")
    ctx.reject_unknown(data, key, _CLIENT_KEYS)
    token = resolve_token(ctx, data, key, env)
    ports = _port_set(ctx, data["ports"], child_path(key, "ports")) if "ports" in data else None
    return ClientEntry(name=name, token=token, ports=ports)


def _check_client_ports(ctx: ConfigContext, relay: PortSet,
                        clients: Mapping[str, ClientEntry]) -> None:
    """Client ranges must lie inside the relay's and must not overlap each other."""
    seen: list[ClientEntry] = []
    for entry in clients.values():
        if entry.ports is None:
            continue
        key = f"clients.{entry.name}.ports"
        outside = entry.ports.difference(relay)
        if outside:
            raise ctx.error(key, f"ports {outside.describe()} are not in the relay's "
                                 f"ports ({relay.describe()})")
        for other in seen:
            assert other.ports is not None
            common = entry.ports.intersection(other.ports)
            if common:
                raise ctx.error(key, f"ports {common.describe()} of client {entry.name!r} "
                                     f"overlap with the ports of client {other.name!r}")
        seen.append(entry)


def _check_unique_tokens(ctx: ConfigContext, clients: Mapping[str, ClientEntry]) -> None:
    """Tokens identify clients, so sharing one would let a client act as another."""
    owners: dict[str, str] = {}
    for entry in clients.values():
        other = owners.setdefault(entry.token.reveal(), entry.name)
        if other != entry.name:
            raise ctx.error(f"clients.{entry.name}",
                            f"client {entry.name!r} has the same token as client {other!r}; "
                            "every client needs its own token")


def _clients(ctx: ConfigContext, value: object, relay: PortSet,
             env: Mapping[str, str]) -> Mapping[str, ClientEntry]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict):
        raise ctx.error("clients", f"expected a mapping of client name to settings, "
                                   f"got {describe_value(value)}")
    clients = {entry.name: entry for entry in
               (_client_entry(ctx, name, item, env) for name, item in value.items())}
    _check_client_ports(ctx, relay, clients)
    _check_unique_tokens(ctx, clients)
    return MappingProxyType(clients)


# --- scalar settings ---------------------------------------------------------------------


def _listen(ctx: ConfigContext, value: object) -> tuple[str, int]:
    text = ctx.expect_str(value, "listen", _LISTEN_EXPECTED)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        ok = bool(sep) and ":" in host
    else:
        host, sep, port = text.rpartition(":")
        ok = bool(sep) and ":" not in host
    ok = ok and bool(host) and not re.search(r"[\s\[\]/]", host)
    if not ok or not re.fullmatch(r"0|[1-9][0-9]{0,4}", port, re.ASCII) or int(port) > MAX_PORT:
        raise ctx.error("listen", f"expected {_LISTEN_EXPECTED} with a port 0-{MAX_PORT}, "
                                  f"got {describe_value(value)}")
    return host, int(port)


def _url_path(ctx: ConfigContext, value: object) -> str:
    path = ctx.expect_str(value, "path", 'a URL path such as "/tunnel"')
    if not path.startswith("/") or _UNSAFE_PATH_CHARS.search(path):
        raise ctx.error("path", 'expected a URL path starting with "/" without spaces, '
                                f'"?" or "#", got {describe_value(value)}')
    return path


def _host(ctx: ConfigContext, value: object, key: str) -> str:
    host = ctx.expect_str(value, key, 'a host name or address, e.g. "0.0.0.0"')
    if not host or re.search(r"[\s/]", host):
        raise ctx.error(key, f"expected a host name or address, got {describe_value(value)}")
    return host


def _state_dir(ctx: ConfigContext, value: object) -> Path:
    text = ctx.expect_str(value, "state_dir", "a directory path")
    if not text:
        raise ctx.error("state_dir", "expected a directory path, got an empty string")
    return ctx.base_dir / text


def _seconds(ctx: ConfigContext, value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ctx.error(key, f"expected a number of seconds, got {describe_value(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ctx.error(key, f"expected a positive number of seconds, "
                             f"got {describe_value(value)}")
    return float(value)


def _log_level(ctx: ConfigContext, value: object) -> str:
    allowed = ", ".join(LOG_LEVELS)
    text = ctx.expect_str(value, "log_level", f"one of {allowed}")
    if text.lower() not in LOG_LEVELS:
        raise ctx.error("log_level", f"expected one of {allowed}, got {describe_value(value)}")
    return text.lower()


def _check_tls(ctx: ConfigContext, data: Mapping[str, object]) -> None:
    """``tls`` is reserved so a future version can add it without changing its meaning."""
    if "tls" not in data:
        return
    value = data["tls"]
    if value is False or (isinstance(value, str) and value.lower() == "off"):
        return
    raise ctx.error("tls", "TLS is not available in this version (terminate TLS in a "
                           f"reverse proxy); allowed: off, got {describe_value(value)}")


def _required(ctx: ConfigContext, data: Mapping[str, object], key: str, hint: str) -> object:
    if key not in data:
        raise ctx.error(key, f"missing required key; {hint}")
    return data[key]


def parse_server_config(data: object, source: str, base_dir: Path, env: Mapping[str, str],
                        lines: Mapping[str, int] | None = None) -> ServerConfig:
    """Validate an already loaded document; ``lines`` (key path -> line) enrich errors."""
    ctx = ConfigContext(source, base_dir, lines or {})
    top = ctx.expect_mapping(data, "", "a mapping of settings at the top level")
    ctx.reject_unknown(top, "", _SERVER_KEYS)
    _check_tls(ctx, top)
    host, port = _listen(ctx, _required(ctx, top, "listen", 'e.g. listen: "0.0.0.0:7000"'))
    relay_ports = _port_set(ctx, _required(ctx, top, "ports", 'e.g. ports: ["6000-6099"]'),
                            "ports")
    interval = _seconds(ctx, top.get("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL),
                        "heartbeat_interval")
    timeout = _seconds(ctx, top.get("heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT),
                       "heartbeat_timeout")
    if timeout <= interval:
        raise ctx.error("heartbeat_timeout", f"must be greater than heartbeat_interval "
                                             f"({interval:g}), got {timeout:g}")
    return ServerConfig(
        source=source,
        listen_host=host,
        listen_port=port,
        path=_url_path(ctx, top.get("path", DEFAULT_PATH)),
        public_host=_host(ctx, top.get("public_host", DEFAULT_PUBLIC_HOST), "public_host"),
        ports=relay_ports,
        state_dir=_state_dir(ctx, top.get("state_dir", DEFAULT_STATE_DIR)),
        clients=_clients(ctx, top.get("clients"), relay_ports, env),
        heartbeat_interval=interval,
        heartbeat_timeout=timeout,
        log_level=_log_level(ctx, top.get("log_level", DEFAULT_LOG_LEVEL)),
    )


def load_server_config(path: str | Path, env: Mapping[str, str] | None = None) -> ServerConfig:
    """Load and validate a relay config file; ``env`` defaults to ``os.environ``."""
    file = Path(path)
    doc = load_yaml_document_file(file)
    return parse_server_config(doc.data, str(path), file.absolute().parent,
                               os.environ if env is None else env, doc.lines)
