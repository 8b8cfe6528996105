"""The ``--expose`` grammar: which local service goes to which relay port.

Grammar: ``[LOCAL_HOST:]LOCAL_PORT[:REMOTE]`` where REMOTE is ``fixed-N``, ``N`` (the same as
``fixed-N``) or ``auto`` (the default). LOCAL_HOST is a host name, an IPv4 address or a
bracketed IPv6 address such as ``[::1]``; it defaults to ``127.0.0.1``. Ports are 1-65535,
written as plain digits without sign or leading zeros.

``A:B`` is ambiguous (host and port, or port and remote?). The rule: if ``A`` is all digits it
is LOCAL_PORT and ``B`` is REMOTE (``8888:6000`` = ``8888:fixed-6000``, ``8888:auto``);
otherwise ``A`` is LOCAL_HOST and ``B`` is LOCAL_PORT (``localhost:8888``,
``10.0.0.5:8888``). Host names made only of digits and dots must be IPv4 addresses, so
``1234:8888:auto`` is rejected rather than guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tunnel.common.errors import ConfigError
from tunnel.common.proto.hostport import MAX_HOST_LENGTH, is_ipv6, is_valid_host, parse_port
from tunnel.common.proto.portset import MAX_PORT, MIN_PORT

__all__ = [
    "DEFAULT_LOCAL_HOST",
    "EXPOSE_GRAMMAR",
    "MAX_HOST_LENGTH",
    "ExposeSpec",
    "format_host_port",
    "is_valid_host",
    "parse_expose",
    "parse_port",
]

EXPOSE_GRAMMAR = (
    "[LOCAL_HOST:]LOCAL_PORT[:REMOTE] where REMOTE is fixed-N, N or auto (default auto); "
    "e.g. 8888:fixed-6000, 6006, 127.0.0.1:22:6022"
)
DEFAULT_LOCAL_HOST = "127.0.0.1"
class _Invalid(Exception):
    """A reason the spec is wrong; parse_expose adds the spec and the grammar."""


@dataclass(frozen=True)
class ExposeSpec:
    """One parsed ``--expose``: a local target and how its relay port is chosen."""

    local_host: str
    local_port: int
    mode: Literal["fixed", "auto"]
    remote_port: int | None

    @property
    def target(self) -> str:
        """The local address to connect to, e.g. ``127.0.0.1:8888`` or ``[::1]:22``."""
        return format_host_port(self.local_host, self.local_port)

    def describe_remote(self) -> str:
        """The remote part in grammar notation: ``fixed-6000`` or ``auto``."""
        return f"fixed-{self.remote_port}" if self.mode == "fixed" else "auto"


def format_host_port(host: str, port: int) -> str:
    """``host:port`` with IPv6 addresses bracketed, so the result parses back unambiguously."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port(text: str, what: str) -> int:
    port = parse_port(text)
    if port is None:
        shown = f"{text!r}" if text else "nothing"
        raise _Invalid(f"{what} must be a port {MIN_PORT}-{MAX_PORT} written as digits "
                       f"without leading zeros, got {shown}")
    return port


def _remote(text: str) -> tuple[Literal["fixed", "auto"], int | None]:
    if text == "auto":
        return "auto", None
    number = text.removeprefix("fixed-")
    if number == text and not text[:1].isdigit():
        raise _Invalid(f"REMOTE must be fixed-N, N or auto, got {text!r}")
    return "fixed", _port(number, "the remote port")


def _ipv6(text: str) -> tuple[str, str]:
    """Split ``[ADDR]:REST`` into the address and what follows the colon."""
    host, sep, rest = text[1:].partition("]")
    if not sep:
        raise _Invalid("missing ']' after the IPv6 address")
    if not is_ipv6(host):
        raise _Invalid(f"{host!r} is not an IPv6 address")
    if not rest.startswith(":"):
        raise _Invalid("expected ':LOCAL_PORT' after the bracketed IPv6 address")
    return host, rest[1:]


def _host(text: str) -> str:
    if not is_valid_host(text):
        raise _Invalid(f"{text!r} is not a valid host name or IPv4 address "
                       "(write IPv6 addresses in brackets, e.g. [::1]:22)")
    return text


def _parse(spec: str) -> ExposeSpec:
    if not spec:
        raise _Invalid("empty spec")
    if spec.startswith("["):
        host, rest = _ipv6(spec)
        parts = rest.split(":")
        if len(parts) > 2:
            raise _Invalid("too many ':' separated parts")
        remote = _remote(parts[1]) if len(parts) == 2 else ("auto", None)
        return ExposeSpec(host, _port(parts[0], "LOCAL_PORT"), *remote)
    parts = spec.split(":")
    if len(parts) == 1:
        return ExposeSpec(DEFAULT_LOCAL_HOST, _port(parts[0], "LOCAL_PORT"), "auto", None)
    if len(parts) == 2 and parts[0].isascii() and parts[0].isdigit():
        return ExposeSpec(DEFAULT_LOCAL_HOST, _port(parts[0], "LOCAL_PORT"), *_remote(parts[1]))
    if len(parts) == 2:
        return ExposeSpec(_host(parts[0]), _port(parts[1], "LOCAL_PORT"), "auto", None)
    if len(parts) == 3:
        return ExposeSpec(_host(parts[0]), _port(parts[1], "LOCAL_PORT"), *_remote(parts[2]))
    raise _Invalid("too many ':' separated parts (write IPv6 addresses in brackets, "
                   "e.g. [::1]:22)")


def parse_expose(spec: str, source: str = "--expose") -> ExposeSpec:
    """Parse one expose spec; see the module docstring for the grammar and the ``A:B`` rule.

    Errors are ConfigError(source, spec, reason + "; expected " + EXPOSE_GRAMMAR).
    """
    try:
        return _parse(spec)
    except _Invalid as exc:
        raise ConfigError(source, spec, f"{exc}; expected {EXPOSE_GRAMMAR}") from None
