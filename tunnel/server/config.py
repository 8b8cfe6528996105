"""Typed, strictly validated relay configuration.

A relay config is edited by hand, rarely, and mistakes in it are security relevant (a typo'd
key that silently falls back to a default, a ``ports`` entry YAML read as a boolean). So
everything not explicitly allowed is an error, and every error names the file, the dotted
key path and what would have been accepted. Token values never appear in messages or reprs.

The token helpers (:func:`resolve_token`) are shared with the client's settings file.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal
from urllib.parse import urlsplit

from tunnel.common.config.base import (
    DEFAULT_PATH,
    MAX_TOKEN_FILE_BYTES,
    MIN_TOKEN_LENGTH,
    TOKEN_KEYS,
    ConfigContext,
    child_path,
    describe_value,
    port_set,
    resolve_token,
    warn_if_readable,
)
from tunnel.common.config.credentials import parse_public_key, shown_name
from tunnel.common.config.yamlsafe import load_yaml_document_file
from tunnel.common.errors import ConfigError
from tunnel.common.proto.frames import MAX_STREAMS_LIMIT
from tunnel.common.proto.messages import MAX_HEARTBEAT_SECONDS
from tunnel.common.proto.portset import MAX_PORT, PortSet
from tunnel.common.proto.secret import Secret
from tunnel.server.config_dashboard import (
    AlertSettings,
    DashboardSettings,
    parse_alerts,
    parse_dashboard,
)

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
    "TlsSettings",
    "describe_value",
    "load_clients_file",
    "load_server_config",
    "parse_server_config",
    "resolve_token",
]

DEFAULT_PUBLIC_HOST = "0.0.0.0"
DEFAULT_STATE_DIR = "./tunnel-state"
DEFAULT_LOG_LEVEL = "info"
LOG_LEVELS = ("debug", "info", "warning", "error")
CLIENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
DEFAULT_HEARTBEAT_INTERVAL = 10.0
DEFAULT_HEARTBEAT_TIMEOUT = 30.0
DEFAULT_MAX_STREAMS = 256
#: New visitor connections per second, per source address and per public port (B-6: an
#: open/reset flood, CVE-2023-44487 "Rapid Reset", must not become a stream flood).
DEFAULT_OPENS_PER_SOURCE = 200.0
DEFAULT_OPENS_PER_PORT = 2000.0
MAX_OPEN_RATE = 1_000_000.0
_OPEN_RATE_KEYS = ("per_source", "per_port")

_CLIENT_NAME_RE = re.compile(CLIENT_NAME_PATTERN)
_LISTEN_EXPECTED = '"HOST:PORT", e.g. "0.0.0.0:7000" or "[::1]:7000"'
_CREDENTIAL_KEYS = (*TOKEN_KEYS, "public_key")
_SERVER_KEYS = ("listen", "path", "public_host", "ports", "state_dir", "clients",
                "clients_file", "public_url", "heartbeat_interval", "heartbeat_timeout",
                "log_level", "tls", "dashboard", "alerts", "max_streams", "open_rate")
_CLIENT_KEYS = (*_CREDENTIAL_KEYS, "ports")
_UNSAFE_PATH_CHARS = re.compile(r"[\s?#]")
_TLS_KEYS = ("cert", "key")
_TLS_ALLOWED = 'auto, off, or a mapping {cert: PATH, key: PATH}'


@dataclass(frozen=True)
class TlsSettings:
    """How the relay serves the link: ``auto`` (self-signed, generated once), ``off``, files."""

    mode: Literal["auto", "off", "files"]
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class ClientEntry:
    """One client allowed to log in to the relay."""

    name: str
    token: Secret | None
    """A shared token (HMAC login), or None when the client holds an Ed25519 key."""
    ports: PortSet | None
    """``None``: may use any relay port not reserved by another client's ``ports``."""
    public_key: str | None = None
    """``ed25519:...``: the relay keeps only this, so its files cannot impersonate anyone."""
    source: str = field(default="", compare=False)
    """The file that defines the client (server.yaml or the clients file)."""


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
    tls: TlsSettings = field(default_factory=lambda: TlsSettings("auto"))
    public_url: str | None = None
    clients_file: Path | None = None
    config_dir: Path = field(default_factory=Path)
    dashboard: DashboardSettings | None = None
    alerts: AlertSettings | None = None
    max_streams: int = DEFAULT_MAX_STREAMS
    """Concurrent forwarded connections per client; memory is bounded by this x window."""
    opens_per_source: float = DEFAULT_OPENS_PER_SOURCE
    """New visitor connections per second one address may open (excess reset)."""
    opens_per_port: float = DEFAULT_OPENS_PER_PORT
    """New visitor connections per second one public port accepts from everyone."""

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


# --- clients -----------------------------------------------------------------------------


def _client_entry(ctx: ConfigContext, prefix: str, name: object, value: object,
                  env: Mapping[str, str]) -> ClientEntry:
    if not isinstance(name, str) or not _CLIENT_NAME_RE.fullmatch(name):
        shown = (f'string "{shown_name(name)}"' if isinstance(name, str)
                 else describe_value(name))
        raise ctx.error(child_path(prefix, shown_name(name)),
                        f"invalid client name {shown}; names are 1-63 "
                        "letters, digits, '.', '_' or '-', starting with a letter or digit")
    key = child_path(prefix, name)
    if value is None:
        raise ctx.error(key, "expected a mapping with one of token, token_env, token_file, "
                             "public_key")
    data = ctx.expect_mapping(value, key, "a mapping with a credential and ports")
    ctx.reject_unknown(data, key, _CLIENT_KEYS)
    ports = port_set(ctx, data["ports"], child_path(key, "ports")) if "ports" in data else None
    if "public_key" in data:
        others = [k for k in TOKEN_KEYS if k in data]
        if others:
            raise ctx.error(child_path(key, others[0]), "conflicting credentials public_key "
                            f"and {others[0]}; set exactly one of {', '.join(_CREDENTIAL_KEYS)}")
        public = parse_public_key(data["public_key"], ctx.source, child_path(key, "public_key"))
        return ClientEntry(name, None, ports, public_key=public, source=ctx.source)
    token = resolve_token(ctx, data, key, env)
    return ClientEntry(name=name, token=token, ports=ports, source=ctx.source)


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
        credential = entry.token.reveal() if entry.token is not None else entry.public_key
        assert credential is not None
        other = owners.setdefault(credential, entry.name)
        if other != entry.name:
            raise ctx.error(f"clients.{entry.name}",
                            f"client {entry.name!r} has the same credential as client "
                            f"{other!r}; every client needs its own")


def _client_mapping(ctx: ConfigContext, prefix: str, value: object,
                    env: Mapping[str, str]) -> dict[str, ClientEntry]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ctx.error(prefix, f"expected a mapping of client name to settings, "
                                f"got {describe_value(value)}")
    return {entry.name: entry for entry in
            (_client_entry(ctx, prefix, name, item, env) for name, item in value.items())}


_NO_CLIENTS_HINT = "write {} for a relay without clients"


def load_clients_file(path: Path, env: Mapping[str, str], *,
                      must_list: bool = False) -> dict[str, ClientEntry]:
    """The clients managed by ``add-client``/``remove-client``: a mapping name -> entry.

    A missing or empty file is an empty list at start-up (``init`` creates it, but a user
    may delete it). With ``must_list`` (a reload) only an explicit ``{}`` means no clients:
    a file that is missing, empty or being written looks the same as one that lists nobody,
    and taking it for that would log every client out.
    """
    if not path.exists():
        if must_list:
            raise ConfigError(str(path), "", f"the clients file is missing (or a dangling "
                                             f"link); {_NO_CLIENTS_HINT}")
        return {}
    doc = load_yaml_document_file(path)
    if doc.data is None and must_list:
        raise ConfigError(str(path), "", "the clients file is empty or holds only comments; "
                                         f"expected a mapping of client name to settings, "
                                         f"{_NO_CLIENTS_HINT}")
    ctx = ConfigContext(str(path), path.parent, doc.lines, doc.columns)
    return _client_mapping(ctx, "", doc.data, env)


def _clients(ctx: ConfigContext, top: Mapping[str, object], relay: PortSet,
             env: Mapping[str, str], must_list: bool
             ) -> tuple[Mapping[str, ClientEntry], Path | None]:
    if must_list and "clients" in top and top["clients"] is None:
        raise ctx.error("clients", "the key is present but empty; expected a mapping of "
                                   f"client name to settings, {_NO_CLIENTS_HINT}")
    clients = _client_mapping(ctx, "clients", top.get("clients"), env)
    clients_file: Path | None = None
    if "clients_file" in top:
        text = ctx.expect_str(top["clients_file"], "clients_file", "a file path")
        clients_file = ctx.base_dir / text
        for name, entry in load_clients_file(clients_file, env, must_list=must_list).items():
            if name in clients:
                raise ConfigError(str(clients_file), name, f"client {name!r} is also defined "
                                  f"in {ctx.source}; names must be unique")
            clients[name] = entry
    _check_client_ports(ctx, relay, clients)
    _check_unique_tokens(ctx, clients)
    return MappingProxyType(clients), clients_file


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
    if value > MAX_HEARTBEAT_SECONDS:  # welcome carries it: clients refuse more (protocol.md)
        raise ctx.error(key, f"expected at most {MAX_HEARTBEAT_SECONDS:g} seconds, "
                             f"got {describe_value(value)}")
    return float(value)


def _log_level(ctx: ConfigContext, value: object) -> str:
    allowed = ", ".join(LOG_LEVELS)
    text = ctx.expect_str(value, "log_level", f"one of {allowed}")
    if text.lower() not in LOG_LEVELS:
        raise ctx.error("log_level", f"expected one of {allowed}, got {describe_value(value)}")
    return text.lower()


def _tls(ctx: ConfigContext, top: Mapping[str, object]) -> TlsSettings:
    if "tls" not in top:
        return TlsSettings("auto")
    value = top["tls"]
    if value is False or (isinstance(value, str) and value.lower() == "off"):
        return TlsSettings("off")
    if isinstance(value, str) and value.lower() == "auto":
        return TlsSettings("auto")
    if isinstance(value, dict):
        data = ctx.expect_mapping(value, "tls", _TLS_ALLOWED)
        ctx.reject_unknown(data, "tls", _TLS_KEYS)
        paths = []
        for name in _TLS_KEYS:
            if name not in data:
                raise ctx.error(f"tls.{name}", f"missing; expected {_TLS_ALLOWED}")
            text = ctx.expect_str(data[name], f"tls.{name}", "a file path")
            paths.append(ctx.base_dir / text)
        return TlsSettings("files", cert=paths[0], key=paths[1])
    raise ctx.error("tls", f"expected {_TLS_ALLOWED}, got {describe_value(value)}")


def _public_url(ctx: ConfigContext, top: Mapping[str, object]) -> str | None:
    """The link URL clients are told to use (join strings); must be ws:// or wss://."""
    if "public_url" not in top:
        return None
    text = ctx.expect_str(top["public_url"], "public_url", "a URL like wss://HOST:PORT/PATH")
    parts = urlsplit(text)
    try:
        port_ok = parts.port is None or 1 <= parts.port <= MAX_PORT
    except ValueError:
        port_ok = False
    if parts.scheme not in ("ws", "wss") or not parts.hostname or parts.query \
            or parts.fragment or "@" in parts.netloc or re.search(r"\s", text) or not port_ok:
        raise ctx.error("public_url", "expected a URL like wss://vps.example.com:7000/tunnel, "
                                      f"got {describe_value(text)}")
    return text


def _max_streams(ctx: ConfigContext, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) \
            or not 1 <= value <= MAX_STREAMS_LIMIT:
        raise ctx.error("max_streams", f"expected a whole number 1-{MAX_STREAMS_LIMIT}, "
                                       f"got {describe_value(value)}")
    return value


def _open_rate(ctx: ConfigContext, top: Mapping[str, object]) -> tuple[float, float]:
    """``open_rate: {per_source: N, per_port: N}``, new visitor connections per second."""
    raw = top.get("open_rate")
    if raw is None:
        return DEFAULT_OPENS_PER_SOURCE, DEFAULT_OPENS_PER_PORT
    table = ctx.expect_mapping(raw, "open_rate", "a mapping {per_source: N, per_port: N}")
    ctx.reject_unknown(table, "open_rate", _OPEN_RATE_KEYS)
    rates = []
    for name, default in zip(_OPEN_RATE_KEYS, (DEFAULT_OPENS_PER_SOURCE,
                                               DEFAULT_OPENS_PER_PORT), strict=True):
        value = table.get(name, default)
        key = f"open_rate.{name}"
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or not 1 <= value <= MAX_OPEN_RATE:
            raise ctx.error(key, f"expected connections per second, 1-{MAX_OPEN_RATE:.0f}, "
                                 f"got {describe_value(value)}")
        rates.append(float(value))
    return rates[0], rates[1]


def _required(ctx: ConfigContext, data: Mapping[str, object], key: str, hint: str) -> object:
    if key not in data:
        raise ctx.error(key, f"missing required key; {hint}")
    return data[key]


def parse_server_config(data: object, source: str, base_dir: Path, env: Mapping[str, str],
                        lines: Mapping[str, int] | None = None,
                        columns: Mapping[str, int] | None = None, *,
                        reload: bool = False) -> ServerConfig:
    """Validate an already loaded document; ``lines``/``columns`` (by key path) enrich errors.

    ``reload``: the relay is running with clients, so a client list that only *looks* empty
    (a missing or empty clients file, ``clients:`` with no value) is an error, not "nobody".
    """
    ctx = ConfigContext(source, base_dir, lines or {}, columns or {})
    top = ctx.expect_mapping(data, "", "a mapping of settings at the top level")
    ctx.reject_unknown(top, "", _SERVER_KEYS)
    tls = _tls(ctx, top)
    host, port = _listen(ctx, _required(ctx, top, "listen", 'e.g. listen: "0.0.0.0:7000"'))
    relay_ports = port_set(ctx, _required(ctx, top, "ports", 'e.g. ports: ["6000-6099"]'),
                            "ports")
    interval = _seconds(ctx, top.get("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL),
                        "heartbeat_interval")
    timeout = _seconds(ctx, top.get("heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT),
                       "heartbeat_timeout")
    if timeout <= interval:
        raise ctx.error("heartbeat_timeout", f"must be greater than heartbeat_interval "
                                             f"({interval:g}), got {timeout:g}")
    clients, clients_file = _clients(ctx, top, relay_ports, env, reload)
    opens_per_source, opens_per_port = _open_rate(ctx, top)
    return ServerConfig(
        source=source,
        listen_host=host,
        listen_port=port,
        path=_url_path(ctx, top.get("path", DEFAULT_PATH)),
        public_host=_host(ctx, top.get("public_host", DEFAULT_PUBLIC_HOST), "public_host"),
        ports=relay_ports,
        state_dir=_state_dir(ctx, top.get("state_dir", DEFAULT_STATE_DIR)),
        clients=clients,
        heartbeat_interval=interval,
        heartbeat_timeout=timeout,
        log_level=_log_level(ctx, top.get("log_level", DEFAULT_LOG_LEVEL)),
        max_streams=_max_streams(ctx, top.get("max_streams", DEFAULT_MAX_STREAMS)),
        opens_per_source=opens_per_source,
        opens_per_port=opens_per_port,
        tls=tls,
        public_url=_public_url(ctx, top),
        clients_file=clients_file,
        config_dir=base_dir,
        dashboard=parse_dashboard(ctx, top, env),
        alerts=parse_alerts(ctx, top),
    )


def load_server_config(path: str | Path, env: Mapping[str, str] | None = None, *,
                       reload: bool = False) -> ServerConfig:
    """Load and validate a relay config file; ``env`` defaults to ``os.environ``.

    ``reload`` as in :func:`parse_server_config`.
    """
    file = Path(path)
    doc = load_yaml_document_file(file)
    config = parse_server_config(doc.data, str(path), file.absolute().parent,
                                 os.environ if env is None else env, doc.lines, doc.columns,
                                 reload=reload)
    inline = doc.data.get("clients") if isinstance(doc.data, dict) else None
    if isinstance(inline, dict) and any(isinstance(v, dict) and "token" in v
                                        for v in inline.values()):
        warn_if_readable(file, "relay config holding client tokens,")
    return config
