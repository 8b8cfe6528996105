"""Live state of the relay: clients, their links and tunnels, and byte counters.

This is the single source the status page and admin API will read. It holds no sockets of
its own beyond references; the control and listener modules change it, always from the
event loop, so no locking is needed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from tunnel.common.aio.link import Link
from tunnel.server.tunnels import Tunnel, TunnelKey

__all__ = [
    "REPLACEMENT_FLAG",
    "REPLACEMENT_WINDOW",
    "ClientRecord",
    "Registry",
]

#: Replacements of one identity's live link within this many seconds are counted...
REPLACEMENT_WINDOW = 60.0
#: ...and this many of them flag the identity as shared by two machines (reliability S-7).
REPLACEMENT_FLAG = 5
#: Replacement times kept per identity; throttling keeps far fewer in any window.
MAX_REPLACEMENTS_KEPT = 64


@dataclass
class ClientRecord:
    name: str
    link: Link | None = None
    address: str = ""
    version: str = ""
    connected_since: float | None = None
    last_seen: float | None = None
    offline_since: float | None = None
    logins: int = 0
    hostname: str = ""
    os: str = ""
    telemetry: dict[str, Any] | None = None
    telemetry_at: float | None = None
    #: When a newer login replaced a live link, within the last REPLACEMENT_WINDOW s.
    replacements: deque[float] = field(
        default_factory=lambda: deque(maxlen=MAX_REPLACEMENTS_KEPT))

    def replacement_rate(self, now: float) -> int:
        """Replacements within the last window (two machines sharing one identity flap)."""
        while self.replacements and now - self.replacements[0] >= REPLACEMENT_WINDOW:
            self.replacements.popleft()
        return len(self.replacements)

    def flapping(self, now: float) -> bool:
        return self.replacement_rate(now) >= REPLACEMENT_FLAG


class Registry:
    """Clients by name and tunnels by identity, with public tunnels indexed by port.

    Invariant: ``by_port`` holds exactly the tunnels of ``tunnels`` that have a port, and a
    port belongs to at most one tunnel; placing a tunnel on a port another identity holds
    (the port changed hands) evicts that one.
    """

    def __init__(self) -> None:
        self.clients: dict[str, ClientRecord] = {}
        self.tunnels: dict[TunnelKey, Tunnel] = {}
        self._ports: dict[int, Tunnel] = {}
        self.by_port: Mapping[int, Tunnel] = MappingProxyType(self._ports)

    def client(self, name: str) -> ClientRecord:
        record = self.clients.get(name)
        if record is None:
            record = self.clients[name] = ClientRecord(name)
        return record

    def attach(self, name: str, link: Link, address: str, version: str,
               now: float) -> Link | None:
        """Make ``link`` the live link of ``name``; return the link it replaces, if any."""
        record = self.client(name)
        old = record.link
        if old is not None:
            self._unroute(old)
            record.replacement_rate(now)  # prune, so the deque stays within the window
            record.replacements.append(now)
        record.link = link
        record.address = address
        record.version = version
        record.connected_since = now
        record.last_seen = now
        record.offline_since = None
        record.logins += 1
        return old

    def detach(self, name: str, link: Link, now: float) -> bool:
        """Forget ``link`` if it is still the live one; return whether it was."""
        record = self.clients.get(name)
        self._unroute(link)
        if record is None or record.link is not link:
            return False
        record.link = None
        record.connected_since = None
        record.last_seen = now
        record.offline_since = now
        return True

    def place(self, tunnel: Tunnel) -> Tunnel:
        """The tunnel known under ``tunnel.key``, adding ``tunnel`` if none is.

        A known tunnel is kept (with its counters and connections) and returned as it is.
        """
        known = self.tunnels.get(tunnel.key)
        if known is not None:
            return known
        if tunnel.port is not None:
            holder = self._ports.get(tunnel.port)
            if holder is not None:
                self.drop(holder.key)
            self._ports[tunnel.port] = tunnel
        self.tunnels[tunnel.key] = tunnel
        return tunnel

    def route(self, key: TunnelKey, link: Link, tunnel_id: int) -> Tunnel:
        """Send the placed tunnel ``key``'s visitors over ``link`` as its tunnel ``tunnel_id``."""
        tunnel = self.tunnels[key]
        tunnel.link, tunnel.tunnel_id = link, tunnel_id
        return tunnel

    def drop(self, key: TunnelKey) -> Tunnel | None:
        tunnel = self.tunnels.pop(key, None)
        if tunnel is not None and tunnel.port is not None:
            del self._ports[tunnel.port]
        return tunnel

    def sync_clients(self, names: set[str]) -> None:
        """One record per configured client (so offline ones show too), none for others."""
        for name in names:
            self.client(name)
        for name in list(self.clients):
            if name not in names and self.clients[name].link is None:
                del self.clients[name]

    def tunnels_of(self, name: str) -> list[Tunnel]:
        return [t for t in self.tunnels.values() if t.client == name]

    def online(self) -> list[ClientRecord]:
        return [c for c in self.clients.values() if c.link is not None]

    def _unroute(self, link: Link) -> None:
        for tunnel in self.tunnels.values():
            if tunnel.link is link:
                tunnel.link = None
