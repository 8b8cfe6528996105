"""Ports for tests and benchmarks that a program will bind later, by number.

A port found free by binding port 0 comes from the kernel's ephemeral range, the same
range the kernel draws from when a relay listens on port 0 or any socket connects out.
Between the moment the test lets go of such a port and the moment a relay binds it as a
fixed tunnel port, the kernel may hand the very number to someone else (CI once saw the
relay's own control port equal the "free" tunnel port). So the ports handed out here lie
*outside* the ephemeral range, where the kernel never assigns on its own, and each one
is checked by binding it. A shuffled pool, walked in order, keeps one process from handing
out a port again soon after a test used it.
"""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default, if the file cannot be read
LOWEST_PORT = 10000  # below this lie well-known services a test must not shadow
HIGHEST_PORT = 65535


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range, inclusive."""
    try:
        lo, hi = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL
    return lo, hi


def candidate_ports(ephemeral: tuple[int, int]) -> list[int]:
    """Every port from LOWEST_PORT up that the kernel would not pick by itself."""
    lo, hi = ephemeral
    return [p for p in range(LOWEST_PORT, HIGHEST_PORT + 1) if not lo <= p <= hi]


class PortPool:
    """Hands out bindable non-ephemeral loopback ports, a shuffled pool walked round."""

    def __init__(self, ports: list[int], rng: random.Random | None = None) -> None:
        if not ports:
            raise RuntimeError("no port outside the ephemeral range to hand out")
        self._ports = list(ports)
        self._allowed = frozenset(ports)
        (rng or random.Random()).shuffle(self._ports)
        self._next = 0

    def _advance(self) -> int:
        port = self._ports[self._next]
        self._next = (self._next + 1) % len(self._ports)
        return port

    def take(self, n: int) -> list[int]:
        """``n`` distinct ports, each bound (and released) together to prove it free; one
        walk round the pool at most, so no port is tried twice."""
        with contextlib.ExitStack() as stack:
            ports: list[int] = []
            for _ in range(len(self._ports)):
                if len(ports) == n:
                    break
                port = self._advance()
                if _bind(stack, port):
                    ports.append(port)
            if len(ports) == n:
                return ports
        raise RuntimeError(f"fewer than {n} free ports outside the ephemeral range")

    def take_range(self, n: int) -> tuple[int, int]:
        """A contiguous run ``(lo, hi)`` of ``n`` free ports, all outside the ephemeral
        range (tried from up to one full walk of the pool's starting points)."""
        for _ in range(len(self._ports)):
            lo = self._advance()
            run = range(lo, lo + n)
            if not all(p in self._allowed for p in run):
                continue
            with contextlib.ExitStack() as stack:
                if all(_bind(stack, p) for p in run):
                    return lo, lo + n - 1
        raise RuntimeError(f"no run of {n} free ports outside the ephemeral range")


def _bind(stack: contextlib.ExitStack, port: int) -> bool:
    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


_POOL: PortPool | None = None


def pool() -> PortPool:
    """This process's pool, made on first use."""
    global _POOL
    if _POOL is None:
        _POOL = PortPool(candidate_ports(ephemeral_range()))
    return _POOL


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports on 127.0.0.1, free a moment ago and never kernel-assigned."""
    return pool().take(n)


def free_port_range(n: int) -> tuple[int, int]:
    """A contiguous range ``(lo, hi)`` of ``n`` ports, free a moment ago."""
    return pool().take_range(n)
