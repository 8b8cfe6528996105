"""The client's settings, resolved from flags, environment and an optional YAML file.

Precedence is flags > environment (``TUNNEL_SERVER``, ``TUNNEL_TOKEN``) > file, the usual
order: the file holds the defaults, the environment suits containers and CI, a flag wins for a
one-off run. ``--expose`` flags, if any, replace the file's ``expose`` list rather than being
appended, so a one-off run never drags in the file's services unexpectedly.

Tokens never appear in URLs (no ``user:pass@`` part) nor in any error message.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tunnel.client.expose import (
    ExposeSpec,
    is_valid_host,
    parse_expose,
    parse_port,
)
from tunnel.common.config.base import (
    DEFAULT_PATH,
    MIN_TOKEN_LENGTH,
    ConfigContext,
    describe_value,
    is_loopback,
    item_path,
    parse_fingerprint,
    resolve_token,
    warn_if_readable,
)
from tunnel.common.errors import ConfigError
from tunnel.common.proto.secret import Secret

__all__ = [
    "ENV_SERVER",
    "ENV_TOKEN",
    "MAX_EXPOSES",
    "SETTINGS_SOURCE",
    "ClientSettings",
    "normalize_server_url",
    "resolve_client_settings",
]

ENV_SERVER = "TUNNEL_SERVER"
ENV_TOKEN = "TUNNEL_TOKEN"
ENV_FINGERPRINT = "TUNNEL_FINGERPRINT"
SETTINGS_SOURCE = "tunnel-client"
"""Names the program in errors about a setting that was given nowhere."""
MAX_EXPOSES = 256
"""Far more services than one client reasonably forwards; bounds the work per login."""

_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}
_FILE_KEYS = ("server", "token", "token_env", "token_file", "key", "name", "fingerprint",
              "ca_file", "insecure", "expose", "source_address")
_URL_FORMS = '"HOST:PORT", "ws://HOST:PORT[/PATH]" or "wss://HOST:PORT[/PATH]"'
_UNSAFE_URL_CHARS = re.compile(r"[\s?#@\\]")


@dataclass(frozen=True)
class ClientSettings:
    """Everything the client needs to connect; ``repr`` never shows the token."""

    server_url: str
    server_host: str
    """Host part for messages, IPv6 bracketed so ``f"{server_host}:{port}"`` reads right."""
    token: Secret | None
    exposes: tuple[ExposeSpec, ...]
    private_key: Secret | None = None
    """An Ed25519 key (from ``join``); used instead of a token when set."""
    fingerprint: str | None = None
    """Pinned SHA-256 of the relay certificate's public key; replaces CA verification."""
    ca_file: Path | None = None
    insecure: bool = False
    source_address: str | None = None
    """Local IP address the link connects from (multi-homed hosts); ``None``: the OS picks."""


class _BadUrl(Exception):
    """Why a relay address is wrong; normalize_server_url adds the context."""


def _split_scheme(value: str) -> tuple[str, str]:
    scheme, sep, rest = value.partition("://")
    if not sep:
        return "wss", value  # secure by default; ws:// must be written out
    mapped = _SCHEMES.get(scheme.lower())
    if mapped is None:
        raise _BadUrl(f"unsupported scheme {scheme!r}; use ws://, wss://, http:// or https://")
    return mapped, rest


_DEFAULT_PORTS = {"wss": 443, "ws": 80}


def _split_host_port(authority: str, default_port: int | None) -> tuple[str, int]:
    """``default_port`` applies to URLs with an explicit scheme (wss://host means 443)."""
    if default_port is not None and (
            authority.endswith("]") or (":" not in authority and authority)):
        authority = f"{authority}:{default_port}"
    if authority.startswith("["):
        host, sep, port_text = authority[1:].partition("]:")
        if not sep:
            raise _BadUrl("missing port; expected [IPv6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _BadUrl(f"{host!r} is not an IPv6 address") from None
        host = f"[{host.lower()}]"
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            raise _BadUrl("missing port; write HOST:PORT (wss://HOST alone means port 443)")
        if not is_valid_host(host):
            raise _BadUrl(f"{host!r} is not a valid host name or address "
                          "(write IPv6 addresses in brackets)")
        host = host.lower()
    port = parse_port(port_text)
    if port is None:
        raise _BadUrl(f"port must be 1-65535 written as digits, got {port_text!r}")
    return host, port


def _split_url(value: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of a relay address."""
    if "@" in value:
        raise _BadUrl("credentials do not belong in the URL; pass the token with --token, "
                      f"{ENV_TOKEN} or the config file")
    if _UNSAFE_URL_CHARS.search(value):
        raise _BadUrl("spaces, '\\', query strings ('?') and fragments ('#') are not allowed")
    scheme, rest = _split_scheme(value)
    authority, slash, path = rest.partition("/")
    explicit = "://" in value
    host, port = _split_host_port(authority, _DEFAULT_PORTS[scheme] if explicit else None)
    # No path, or just "/", means the relay's default path.
    full_path = f"/{path}" if slash and path else DEFAULT_PATH
    return scheme, host, port, full_path


def normalize_server_url(value: str, source: str, key: str = "") -> str:
    """Turn any accepted relay address into ``ws[s]://HOST:PORT/PATH``.

    Accepts ``HOST:PORT``, ``ws://``, ``wss://``, and ``http://``/``https://`` (mapped to
    ws/wss). A missing path becomes ``/tunnel``. There is no default port: the relay's
    control port is whatever its operator chose, so guessing would only hide a mistake.
    """
    try:
        scheme, host, port, path = _split_url(value.strip())
    except _BadUrl as exc:
        # A value with '@' may carry credentials, so it is not echoed.
        shown = "" if "@" in value else f" {value!r}"
        raise ConfigError(source, key, f"invalid relay address{shown}: {exc}; expected "
                                       f"{_URL_FORMS}") from None
    return f"{scheme}://{host}:{port}{path}"


def _url_host(url: str) -> str:
    authority = url.split("://", 1)[1].split("/", 1)[0]
    return authority.rsplit(":", 1)[0]


# --- the optional file ---------------------------------------------------------------------


@dataclass(frozen=True)
class _FileSettings:
    ctx: ConfigContext
    data: Mapping[str, object]


def _load_file(config_path: str) -> _FileSettings:
    from tunnel.common.config.yamlsafe import load_yaml_document_file

    path = Path(config_path)
    doc = load_yaml_document_file(path)
    ctx = ConfigContext(config_path, path.absolute().parent, doc.lines, doc.columns)
    data = ctx.expect_mapping(doc.data, "", "a mapping of settings at the top level")
    ctx.reject_unknown(data, "", _FILE_KEYS)
    if "key" in data or "token" in data:
        warn_if_readable(path, "client settings file holding a credential,")
    return _FileSettings(ctx, data)


def _file_server(file: _FileSettings) -> str:
    value = file.ctx.expect_str(file.data["server"], "server", _URL_FORMS)
    return normalize_server_url(value, file.ctx.source, "server")


def _check_file(file: _FileSettings) -> None:
    """Check the file's own values even where flags or environment override them."""
    if "server" in file.data:
        _file_server(file)
    if "expose" in file.data:
        _file_exposes(file)


def _file_exposes(file: _FileSettings) -> list[ExposeSpec]:
    ctx, value = file.ctx, file.data["expose"]
    if not isinstance(value, list):
        raise ctx.error("expose", f"expected a list of expose specs, got {describe_value(value)}")
    out: list[ExposeSpec] = []
    for index, item in enumerate(value):
        key = item_path("expose", index)
        if not isinstance(item, str):
            # YAML 1.1 reads 8888:6000 as a base-60 integer, so unquoted specs are traps.
            raise ctx.error(key, f"expected a quoted spec string such as \"8888:fixed-6000\", "
                                 f"got {describe_value(item)}")
        out.append(parse_expose(item, f"{ctx.source}: {key}"))
    return out


# --- resolution ----------------------------------------------------------------------------


def _pick(flag: str | None, env: Mapping[str, str], env_name: str) -> tuple[str, str] | None:
    """(value, source) from the flag, else from a non-empty environment variable."""
    if flag is not None:
        return flag, ""
    value = env.get(env_name)
    if value:
        return value, env_name
    return None


def _server(flag: str | None, env: Mapping[str, str], file: _FileSettings | None) -> str:
    picked = _pick(flag, env, ENV_SERVER)
    if picked is not None:
        return normalize_server_url(picked[0], picked[1] or "--server")
    if file is not None and "server" in file.data:
        return _file_server(file)
    raise ConfigError(SETTINGS_SOURCE, "server", "no relay given; pass --server HOST:PORT, "
                      f"set {ENV_SERVER} or put `server:` in the config file (--config)")


def _credential(flag: str | None, env: Mapping[str, str],
                file: _FileSettings | None) -> tuple[Secret | None, Secret | None]:
    """(token, private key): a token from flag/env wins over the file's token or key."""
    picked = _pick(flag, env, ENV_TOKEN)
    if picked is not None:
        value, source = picked[0], picked[1] or "--token"
        if len(value) < MIN_TOKEN_LENGTH:
            raise ConfigError(source, "", f"the token is too short; tokens need at least "
                                          f"{MIN_TOKEN_LENGTH} characters")
        return Secret(value), None
    if file is not None and "key" in file.data:
        if any(k in file.data for k in ("token", "token_env", "token_file")):
            raise file.ctx.error("key", "conflicting credentials: set either key or a token")
        value = file.ctx.expect_str(file.data["key"], "key", "an ed25519: private key")
        from tunnel.common.config.credentials import parse_private_key
        return None, parse_private_key(value, file.ctx.source, "key")
    if file is not None and any(k in file.data for k in ("token", "token_env", "token_file")):
        return resolve_token(file.ctx, file.data, "", env), None
    raise ConfigError(SETTINGS_SOURCE, "token", "no credential; run `tunnel-client join "
                      f"JOIN_STRING` once, or pass --token, set {ENV_TOKEN} or put "
                      "token/token_env/token_file in the config file")


def _fingerprint(flag: str | None, env: Mapping[str, str],
                 file: _FileSettings | None) -> str | None:
    picked = _pick(flag, env, ENV_FINGERPRINT)
    if picked is not None:
        return parse_fingerprint(picked[0], picked[1] or "--fingerprint", "")
    if file is not None and file.data.get("fingerprint") is not None:
        value = file.ctx.expect_str(file.data["fingerprint"], "fingerprint", "sha256:HEX")
        return parse_fingerprint(value, file.ctx.source, "fingerprint")
    return None


def _check_transport(url: str, fingerprint: str | None, insecure: bool) -> None:
    """Plain ws:// only to loopback unless the user says --insecure; pins need wss://."""
    if url.startswith("wss://"):
        return
    if fingerprint is not None:
        raise ConfigError(SETTINGS_SOURCE, "fingerprint", "a pinned fingerprint needs a "
                          "wss:// relay address")
    host = _url_host(url).strip("[]")
    if not insecure and not is_loopback(host):
        raise ConfigError(SETTINGS_SOURCE, "server", f"refusing plain ws:// to {host}: the "
                          "link would be unencrypted; use wss://, or pass --insecure if TLS is "
                          "terminated on a trusted network")




def default_client_config() -> Path:
    """``$XDG_CONFIG_HOME/tunnel/client.yaml`` (``~/.config`` without XDG), written by join."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tunnel" / "client.yaml"


def _exposes(flags: Sequence[str], file: _FileSettings | None) -> tuple[ExposeSpec, ...]:
    if flags:
        specs = [parse_expose(spec) for spec in flags]
    elif file is not None and "expose" in file.data:
        specs = _file_exposes(file)
    else:
        specs = []
    if not specs:
        raise ConfigError(SETTINGS_SOURCE, "expose", "nothing to expose; pass --expose "
                          "LOCAL_PORT[:REMOTE] or list specs under `expose:` in the config file")
    if len(specs) > MAX_EXPOSES:
        raise ConfigError(SETTINGS_SOURCE, "expose", f"{len(specs)} services given; at most "
                                                     f"{MAX_EXPOSES} are allowed")
    _check_unique_remote(specs)
    return tuple(specs)


def _check_unique_remote(specs: Sequence[ExposeSpec]) -> None:
    """Two specs claiming the same fixed port could never both succeed."""
    seen: dict[int, ExposeSpec] = {}
    for spec in specs:
        if spec.remote_port is None:
            continue
        first = seen.setdefault(spec.remote_port, spec)
        if first is not spec:
            raise ConfigError(SETTINGS_SOURCE, "expose",
                              f"remote port {spec.remote_port} is claimed twice (for "
                              f"{first.target} and {spec.target})")


def _source_address(flag: str | None, file: _FileSettings | None) -> str | None:
    """The link's local address: an IP literal, from ``--source-address`` or the file.

    frp calls this ``connectServerLocalIP``: a box with two uplinks picks the one the relay
    should see (and allow), and tests give each client its own loopback address.
    """
    if flag is not None:
        address = _ip_literal(flag)
        if address is None:
            raise ConfigError("--source-address", "", _not_an_ip(flag))
        return address
    if file is None or file.data.get("source_address") is None:
        return None
    text = file.ctx.expect_str(file.data["source_address"], "source_address", "an IP address")
    address = _ip_literal(text)
    if address is None:
        raise file.ctx.error("source_address", _not_an_ip(text))
    return address


def _ip_literal(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text.strip().strip("[]")))
    except ValueError:
        return None


def _not_an_ip(text: str) -> str:
    return (f"{text[:64]!r} is not an IP address; give one of this host's IPv4 or IPv6 "
            "addresses to connect from")


def resolve_client_settings(*, server: str | None, token: str | None, exposes: Sequence[str],
                            config_path: str | None, env: Mapping[str, str],
                            fingerprint: str | None = None, ca_file: str | None = None,
                            insecure: bool = False,
                            source_address: str | None = None) -> ClientSettings:
    """Merge flags, environment and the optional file (in that precedence) and validate.

    The file's ``server`` and ``expose`` are always checked, but its token source is only
    resolved when neither ``--token`` nor ``TUNNEL_TOKEN`` is set (so an unused
    ``token_env`` or ``token_file`` need not exist).
    """
    if config_path is None and default_client_config().exists():
        config_path = str(default_client_config())
    file = _load_file(config_path) if config_path is not None else None
    if file is not None:
        _check_file(file)
    url = _server(server, env, file)
    pin = _fingerprint(fingerprint, env, file)
    if file is not None and "insecure" in file.data:
        insecure = insecure or file.data["insecure"] is True
    _check_transport(url, pin, insecure)
    if ca_file is None and file is not None and "ca_file" in file.data:
        ca_file = str(file.ctx.base_dir / file.ctx.expect_str(file.data["ca_file"], "ca_file"))
    token_value, private_key = _credential(token, env, file)
    return ClientSettings(
        server_url=url,
        server_host=_url_host(url),
        token=token_value,
        exposes=_exposes(exposes, file),
        private_key=private_key,
        fingerprint=pin,
        ca_file=Path(ca_file) if ca_file else None,
        insecure=insecure,
        source_address=_source_address(source_address, file),
    )
