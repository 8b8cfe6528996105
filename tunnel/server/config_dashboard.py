"""The ``dashboard:`` and ``alerts:`` sections of server.yaml.

The dashboard shows who is connected where, so it is locked by default: it listens on
localhost unless told otherwise, and it never starts without a password (there is no
default secret to forget to change, nps's ``web_password=123`` being the cautionary tale).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from tunnel.common.config.base import ConfigContext, child_path, describe_value, warn_if_readable
from tunnel.common.proto.secret import Secret

__all__ = [
    "DEFAULT_DASHBOARD_LISTEN",
    "MIN_PASSWORD_LENGTH",
    "AlertSettings",
    "DashboardSettings",
    "parse_alerts",
    "parse_dashboard",
]

DEFAULT_DASHBOARD_LISTEN = ("127.0.0.1", 7500)
DEFAULT_USERNAME = "admin"
MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_FILE_BYTES = 4096
DEFAULT_ALERT_DEBOUNCE = 30.0
DEFAULT_ALERT_RETRIES = 5
_PASSWORD_KEYS = ("password", "password_env", "password_file", "password_hash")
_DASHBOARD_KEYS = ("listen", "username", *_PASSWORD_KEYS, "hosts")
_ALERT_KEYS = ("webhook", "debounce", "retries")
_HASH_RE = re.compile(r"pbkdf2_sha256\$([0-9]{4,7})\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")
_HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]+\]")


@dataclass(frozen=True)
class DashboardSettings:
    listen_host: str
    listen_port: int
    username: str
    password: Secret | None
    """The plain password, or None when only ``password_hash`` is configured."""
    password_hash: str | None
    """``pbkdf2_sha256$ITERATIONS$SALT_B64$HASH_B64``."""
    hosts: tuple[str, ...]
    """Host header values accepted besides loopback names (DNS-rebinding guard)."""


@dataclass(frozen=True)
class AlertSettings:
    webhook: str
    debounce: float
    retries: int


def _listen(ctx: ConfigContext, value: object, key: str) -> tuple[str, int]:
    text = ctx.expect_str(value, key, '"HOST:PORT", e.g. "127.0.0.1:7500"')
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not re.fullmatch(r"0|[1-9][0-9]{0,4}", port) or int(port) > 65535:
        raise ctx.error(key, f'expected "HOST:PORT", got {describe_value(value)}')
    return host, int(port)


def _password(ctx: ConfigContext, data: Mapping[str, object], key: str,
              env: Mapping[str, str]) -> tuple[Secret | None, str | None]:
    given = [name for name in _PASSWORD_KEYS if name in data]
    if len(given) != 1:
        raise ctx.error(key, "the dashboard needs exactly one of " + ", ".join(_PASSWORD_KEYS)
                        + " (there is no default password; `tunnel-server init` writes one)")
    name = given[0]
    sub = child_path(key, name)
    text = ctx.expect_str(data[name], sub)
    if name == "password_hash":
        match = _HASH_RE.fullmatch(text)
        try:
            ok = match is not None and bool(base64.b64decode(match.group(2), validate=True)) \
                and len(base64.b64decode(match.group(3), validate=True)) == 32
        except binascii.Error:
            ok = False
        if not ok:
            raise ctx.error(sub, "expected pbkdf2_sha256$ITERATIONS$SALT_BASE64$HASH_BASE64")
        return None, text
    if name == "password_env":
        if text not in env:
            raise ctx.error(sub, f"environment variable {text} is not set")
        value = env[text]
    elif name == "password_file":
        path = ctx.base_dir / text
        try:
            raw = path.read_bytes()[:MAX_PASSWORD_FILE_BYTES + 1]
        except OSError as exc:
            raise ctx.error(sub, f"cannot read {path}: {exc.strerror or exc}") from None
        if len(raw) > MAX_PASSWORD_FILE_BYTES:
            raise ctx.error(sub, f"{path} is larger than {MAX_PASSWORD_FILE_BYTES} bytes")
        warn_if_readable(path, "dashboard password file")
        value = raw.decode("utf-8", "replace").rstrip("\r\n")
    else:
        value = text
    if len(value) < MIN_PASSWORD_LENGTH:
        raise ctx.error(sub, f"the dashboard password needs at least {MIN_PASSWORD_LENGTH} "
                             "characters")
    return Secret(value), None


def _hosts(ctx: ConfigContext, value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ctx.error(key, f"expected a list of host names, got {describe_value(value)}")
    for item in value:
        if not _HOST_RE.fullmatch(item):
            raise ctx.error(key, f"invalid host name {describe_value(item)}")
    return tuple(item.lower() for item in value)


def parse_dashboard(ctx: ConfigContext, top: Mapping[str, object],
                    env: Mapping[str, str]) -> DashboardSettings | None:
    """None when the section is absent: no password, no dashboard."""
    if "dashboard" not in top:
        return None
    data = ctx.expect_mapping(top["dashboard"], "dashboard", "a mapping")
    ctx.reject_unknown(data, "dashboard", _DASHBOARD_KEYS)
    host, port = DEFAULT_DASHBOARD_LISTEN
    if "listen" in data:
        host, port = _listen(ctx, data["listen"], "dashboard.listen")
    username = ctx.expect_str(data.get("username", DEFAULT_USERNAME), "dashboard.username")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", username):
        raise ctx.error("dashboard.username", "expected 1-64 letters, digits, '.', '_', '-'")
    password, password_hash = _password(ctx, data, "dashboard", env)
    hosts = _hosts(ctx, data["hosts"], "dashboard.hosts") if "hosts" in data else ()
    return DashboardSettings(host, port, username, password, password_hash, hosts)


def parse_alerts(ctx: ConfigContext, top: Mapping[str, object]) -> AlertSettings | None:
    if "alerts" not in top:
        return None
    data = ctx.expect_mapping(top["alerts"], "alerts", "a mapping with webhook")
    ctx.reject_unknown(data, "alerts", _ALERT_KEYS)
    if "webhook" not in data:
        raise ctx.error("alerts.webhook", "missing; expected an http:// or https:// URL")
    url = ctx.expect_str(data["webhook"], "alerts.webhook", "an http:// or https:// URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ctx.error("alerts.webhook", f"expected an http:// or https:// URL, "
                                          f"got {describe_value(url)}")
    debounce = data.get("debounce", DEFAULT_ALERT_DEBOUNCE)
    if isinstance(debounce, bool) or not isinstance(debounce, int | float) \
            or not math.isfinite(debounce) or debounce < 0:
        raise ctx.error("alerts.debounce", "expected a number of seconds >= 0, "
                                           f"got {describe_value(debounce)}")
    retries = data.get("retries", DEFAULT_ALERT_RETRIES)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 20:
        raise ctx.error("alerts.retries", f"expected 0-20, got {describe_value(retries)}")
    return AlertSettings(url, float(debounce), retries)
