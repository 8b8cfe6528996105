"""Config value checks both programs share: key paths, ports, tokens, fingerprints, hosts.

Both the relay's config and the client's settings file are edited by hand; they share one
way of naming values in errors (``boolean true``, ``string "08080"``), one error context
(file, dotted key path such as ``clients.alice.ports[2]``, line) and the same rules for
ports, tokens and certificate fingerprints (``sha256:`` and 64 hex digits).

This module imports neither PyYAML nor ``ssl``: checks of flags alone (a client started
without ``--config``) and the join-string codec use it without loading either.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from tunnel.common.errors import ConfigError
from tunnel.common.proto.portset import MAX_PORT, MIN_PORT, PortSet
from tunnel.common.proto.secret import Secret, weakness

__all__ = [
    "DEFAULT_PATH",
    "FINGERPRINT_PREFIX",
    "LOOPBACK_NAMES",
    "MALFORMED_FINGERPRINT",
    "MAX_TOKEN_FILE_BYTES",
    "MIN_TOKEN_LENGTH",
    "PORT_EXPECTED",
    "TOKEN_KEYS",
    "ConfigContext",
    "child_path",
    "describe_value",
    "is_loopback",
    "item_path",
    "parse_fingerprint",
    "port_range",
    "port_set",
    "resolve_token",
    "warn_if_readable",
]


def child_path(parent: str, key: str) -> str:
    """The dotted key path of ``key`` inside the mapping at ``parent``."""
    return f"{parent}.{key}" if parent else key


def item_path(parent: str, index: int) -> str:
    """The key path of item ``index`` of the sequence at ``parent``."""
    return f"{parent}[{index}]"

log = logging.getLogger("tunnel.config")

DEFAULT_PATH = "/tunnel"
"""The relay's WebSocket path when none is configured (client and relay agree on it)."""
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_FILE_BYTES = 4096
"""A token file holds one line; refuse to slurp something that clearly is not one."""
TOKEN_KEYS = ("token", "token_env", "token_file")

_PORT_RANGE_RE = re.compile(r"([0-9]+)-([0-9]+)", re.ASCII)
PORT_EXPECTED = f'expected a port number {MIN_PORT}-{MAX_PORT} or a range "A-B"'

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
    """Where values come from: the file (for messages), its directory and key positions."""

    source: str
    base_dir: Path
    lines: Mapping[str, int]
    columns: Mapping[str, int] = field(default_factory=dict)

    def error(self, key: str, message: str) -> ConfigError:
        """An error naming the key's line and column, so an editor can jump right to it."""
        line = self.lines.get(key)
        column = self.columns.get(key)
        if line is None:
            suffix = ""
        elif column is None:
            suffix = f" (line {line})"
        else:
            suffix = f" (line {line}, column {column})"
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


# --- ports -------------------------------------------------------------------------------


def port_range(ctx: ConfigContext, value: object, key: str) -> tuple[int, int]:
    """One ``ports`` item: an int (never a bool) or an exact ``"A-B"`` string."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not MIN_PORT <= value <= MAX_PORT:
            raise ctx.error(key, f"{PORT_EXPECTED}, got {describe_value(value)} "
                                 f"(outside {MIN_PORT}-{MAX_PORT})")
        return value, value
    if not isinstance(value, str):
        raise ctx.error(key, f"{PORT_EXPECTED}, got {describe_value(value)}")
    match = _PORT_RANGE_RE.fullmatch(value)
    if match is None:
        raise ctx.error(key, f"{PORT_EXPECTED}, got {describe_value(value)} "
                             "(write single ports as unquoted numbers)")
    if any(part.startswith("0") for part in match.groups()):
        raise ctx.error(key, f"{PORT_EXPECTED}, got {describe_value(value)} "
                             "(leading zeros are not allowed)")
    lo, hi = int(match.group(1)), int(match.group(2))
    if not (MIN_PORT <= lo <= MAX_PORT and MIN_PORT <= hi <= MAX_PORT):
        raise ctx.error(key, f"range {value} is outside {MIN_PORT}-{MAX_PORT}")
    if lo > hi:
        raise ctx.error(key, f"reversed range {value}: the start must not exceed the end")
    return lo, hi


def port_set(ctx: ConfigContext, value: object, key: str) -> PortSet:
    if not isinstance(value, list):
        raise ctx.error(key, f'expected a list of ports and "A-B" ranges, '
                             f"got {describe_value(value)}")
    if not value:
        raise ctx.error(key, 'must not be empty; list ports and "A-B" ranges')
    return PortSet(port_range(ctx, item, item_path(key, i)) for i, item in enumerate(value))


# --- tokens ------------------------------------------------------------------------------


def _check_token_length(ctx: ConfigContext, value: str, key: str, origin: str) -> Secret:
    if len(value) < MIN_TOKEN_LENGTH:
        raise ctx.error(key, f"{origin} is too short; tokens need at least "
                             f"{MIN_TOKEN_LENGTH} characters")
    weak = weakness(value)  # empty, published default, or under 128 bits (reliability S-1)
    if weak is not None:
        raise ctx.error(key, f"{origin} is not usable: {weak.removeprefix('the token is ')}")
    return Secret(value)


def _token_from_env(ctx: ConfigContext, value: object, key: str,
                    env: Mapping[str, str]) -> Secret:
    name = ctx.expect_str(value, key, "the name of an environment variable")
    if name not in env:
        raise ctx.error(key, f"environment variable {name} is not set")
    return _check_token_length(ctx, env[name], key, f"the token in environment variable {name}")


def warn_if_readable(path: Path, what: str = "token file") -> None:
    """Credentials in a group/world readable file leak to other users of the machine."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s %s is readable by group or others (mode %o); "
                    "run: chmod 600 %s", what, path, stat.S_IMODE(mode), path)


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
        warn_if_readable(path)
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
    given = [name for name in TOKEN_KEYS if name in data]
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


FINGERPRINT_PREFIX = "sha256:"
MALFORMED_FINGERPRINT = "malformed fingerprint: expected sha256: followed by 64 hex digits"
_FINGERPRINT_BODY = re.compile(r"[0-9a-f]{64}|[0-9a-f]{2}(?::[0-9a-f]{2}){31}")
_MAX_FINGERPRINT_INPUT = len(FINGERPRINT_PREFIX) + 32 * 3


def parse_fingerprint(text: str, source: str, key: str = "fingerprint") -> str:
    """Normalize the spellings users paste (upper case, ``AA:BB:…``, no prefix) to one form.

    Malformed input is not echoed: it may be long garbage, or something secret pasted into
    the wrong field.
    """
    candidate = text.strip().lower() if isinstance(text, str) else ""
    if len(candidate) > _MAX_FINGERPRINT_INPUT:
        raise ConfigError(source, key, MALFORMED_FINGERPRINT)
    candidate = candidate.removeprefix(FINGERPRINT_PREFIX)
    if not _FINGERPRINT_BODY.fullmatch(candidate):
        raise ConfigError(source, key, MALFORMED_FINGERPRINT)
    return FINGERPRINT_PREFIX + candidate.replace(":", "")


LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def is_loopback(host: str) -> bool:
    """``localhost`` or an address in 127.0.0.0/8 or ::1 (no name resolution)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
