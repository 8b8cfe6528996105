"""Live state of the relay: clients, their links and tunnels, and byte counters.

This is the single source the status page and admin API will read. It holds no sockets of
its own beyond references; the control and listener modules change it, always from the
event loop, so no locking is needed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tunnel.common.aio.link import Link, Traffic

if TYPE_CHECKING:
    from tunnel.server.listeners import VisitorSocket

__all__ = [
    "REPLACEMENT_FLAG",
    "REPLACEMENT_WINDOW",
    "ClientRecord",
    "Registry",
    "TunnelRecord",
]

#: Replacements of one identity's live link within this many seconds are counted...
REPLACEMENT_WINDOW = 60.0
#: ...and this many of them flag the identity as shared by two machines (reliability S-7).
REPLACEMENT_FLAG = 5
#: Replacement times kept per identity; throttling keeps far fewer in any window.
MAX_REPLACEMENTS_KEPT = 64

TunnelMode = Literal["fixed", "auto"]


@dataclass
class TunnelRecord:
    """One public port. It outlives links: while its owner is offline ``link`` is None."""

    port: int
    client: str
    mode: TunnelMode
    target: str
    traffic: Traffic = field(default_factory=Traffic)
    link: Link | None = None
    tunnel_id: int = 0  # the owner's id for this tunnel on ``link``
    connections: set[VisitorSocket] = field(default_factory=set)
    #: Visitors reset at once instead of queued: the link's stream limit (F-5) or the
    #: per-source cap was reached. Counted so an operator sees a client at its limit.
    streams_refused: int = 0


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
    """Clients by name and tunnels by public port."""

    def __init__(self) -> None:
        self.clients: dict[str, ClientRecord] = {}
        self.tunnels: dict[int, TunnelRecord] = {}

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

    def route(self, port: int, name: str, link: Link, tunnel_id: int, mode: TunnelMode,
              target: str) -> TunnelRecord:
        record = self.tunnels.get(port)
        if record is None or record.client != name:
            record = self.tunnels[port] = TunnelRecord(port, name, mode, target)
        record.mode, record.target = mode, target
        record.link, record.tunnel_id = link, tunnel_id
        return record

    def reserve(self, port: int, name: str, mode: TunnelMode, target: str) -> TunnelRecord:
        """A leased port whose owner is not connected yet (relay start-up)."""
        record = self.tunnels.get(port)
        if record is None:
            record = self.tunnels[port] = TunnelRecord(port, name, mode, target)
        return record

    def drop(self, port: int) -> None:
        self.tunnels.pop(port, None)

    def sync_clients(self, names: set[str]) -> None:
        """One record per configured client (so offline ones show too), none for others."""
        for name in names:
            self.client(name)
        for name in list(self.clients):
            if name not in names and self.clients[name].link is None:
                del self.clients[name]

    def tunnels_of(self, name: str) -> list[TunnelRecord]:
        return [t for t in self.tunnels.values() if t.client == name]

    def online(self) -> list[ClientRecord]:
        return [c for c in self.clients.values() if c.link is not None]

    def _unroute(self, link: Link) -> None:
        for record in self.tunnels.values():
            if record.link is link:
                record.link = None
