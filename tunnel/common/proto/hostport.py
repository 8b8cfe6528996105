"""``host:port`` text as the protocol carries it (an ``expose`` target) and as the client's
``--expose`` grammar writes it: one definition, so the relay never refuses a target the
shipped client accepted.

A host is a DNS name (labels of letters, digits and inner hyphens, at most
``MAX_HOST_LENGTH`` characters, an optional final dot), an IPv4 address, or (in a target)
a bracketed IPv6 address (with an optional ``%zone``: an interface name); a port is plain
digits 1-65535 without sign or leading zero.
"""

from __future__ import annotations

import ipaddress
import re

from tunnel.common.proto.portset import MAX_PORT, MIN_PORT

__all__ = ["MAX_HOST_LENGTH", "MAX_TARGET_LENGTH", "is_host_port", "is_ipv6", "is_valid_host",
           "parse_port"]

MAX_HOST_LENGTH = 253
"""The DNS limit for a full host name."""
#: The longest ``host:port``: a full-length host name, a colon and five digits.
MAX_TARGET_LENGTH = MAX_HOST_LENGTH + 6

_PORT_RE = re.compile(r"[1-9][0-9]{0,4}", re.ASCII)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?", re.ASCII)
_DOTTED_DIGITS_RE = re.compile(r"[0-9.]+", re.ASCII)
_ZONE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)


def parse_port(text: str) -> int | None:
    """A port written as plain digits 1-65535 without sign or leading zero, else None."""
    if not _PORT_RE.fullmatch(text):
        return None
    port = int(text)
    return port if MIN_PORT <= port <= MAX_PORT else None


def is_valid_host(host: str) -> bool:
    """A DNS host name or an IPv4 address (IPv6 is checked by the caller, unbracketed)."""
    if not host or len(host) > MAX_HOST_LENGTH or not _HOSTNAME_RE.fullmatch(host):
        return False
    if _DOTTED_DIGITS_RE.fullmatch(host):
        # All digits and dots is meant as IPv4; "999.1.1.1" must not pass as a host name.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
    return True


def is_host_port(text: str) -> bool:
    """``HOST:PORT`` or ``[IPV6]:PORT``, as :func:`format_host_port` writes a target."""
    host, sep, port = text.rpartition(":")
    if not sep or len(text) > MAX_TARGET_LENGTH or parse_port(port) is None:
        return False
    if host.startswith("[") and host.endswith("]"):
        return is_ipv6(host[1:-1])
    return is_valid_host(host)


def is_ipv6(text: str) -> bool:
    """An IPv6 address (unbracketed); a zone id, if any, is an interface name."""
    address, _, zone = text.partition("%")
    if zone and not _ZONE_RE.fullmatch(zone):
        return False
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        return False
    return True
