"""Tunnels as the relay sees them: a kind, an identity, a target and live state.

A tunnel's identity is :class:`TunnelKey` (its client plus the tunnel's name within that
client), never its public port: a kind that publishes no port has a key all the same, and the
registry keys every tunnel by it. What a kind needs from the outside world (a public port, a
UDP socket, an HTTP route) is its :class:`Binding`'s business; the code that handles an
``expose`` picks the binding by kind and routes the tunnel it returns, whatever the kind.

Invariants, checked where a tunnel is made:

* a kind that publishes a port (:attr:`TunnelKind.publishes_port`) has ``port`` set, every
  other kind has ``port`` None;
* a public TCP tunnel is named after its port (:meth:`TunnelKey.public_tcp`), because the wire
  carries no tunnel name for it: the port is what the client claimed, and a lease is a claim
  on exactly one port. Kinds whose ``expose`` carries a name use that name instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Literal, Protocol

from tunnel.common.aio.link import Link, Traffic

if TYPE_CHECKING:
    from tunnel.server.listeners import VisitorSocket

__all__ = [
    "Binding",
    "Claim",
    "Tunnel",
    "TunnelKey",
    "TunnelKind",
    "TunnelMode",
    "TunnelState",
]

#: How a public port was chosen: named by the client (``fixed``) or picked by the relay.
TunnelMode = Literal["fixed", "auto"]


class TunnelKind(StrEnum):
    """What a tunnel is; each kind has one :class:`Binding` on the relay."""

    #: A TCP port on the relay's public address; visitors connect to it.
    PUBLIC_TCP = "public_tcp"

    @property
    def publishes_port(self) -> bool:
        """Whether tunnels of this kind own a public port on the relay."""
        return self is TunnelKind.PUBLIC_TCP


class TunnelState(StrEnum):
    """Whether a tunnel can carry visitors now."""

    #: Known (leased or claimed) but its owner is not connected: visitors are refused.
    WAITING = "waiting"
    #: Routed to its owner's live link.
    LIVE = "live"


@dataclass(frozen=True, slots=True, order=True)
class TunnelKey:
    """A tunnel's identity: unique on the relay, stable across its owner's reconnects."""

    client: str
    #: The tunnel's name within its client.
    name: str

    def __post_init__(self) -> None:
        if not self.client or not self.name:
            raise ValueError(f"tunnel key needs a client and a name: {self!r}")

    @classmethod
    def public_tcp(cls, client: str, port: int) -> TunnelKey:
        """The key of ``client``'s public TCP tunnel on ``port``."""
        return cls(client, f"tcp/{port}")


@dataclass(eq=False)
class Tunnel:
    """One tunnel; it outlives links: while its owner is offline ``link`` is None."""

    key: TunnelKey
    kind: TunnelKind
    #: The client's local service, ``"host:port"``.
    target: str
    mode: TunnelMode
    #: The relay port visitors connect to; None for kinds that publish none.
    port: int | None = None
    traffic: Traffic = field(default_factory=Traffic)
    link: Link | None = None
    #: The owner's id for this tunnel on ``link`` (per link, chosen by the client).
    tunnel_id: int = 0
    connections: set[VisitorSocket] = field(default_factory=set)
    #: Visitors reset at once instead of queued: the link's stream limit (F-5) or the
    #: per-source cap was reached. Counted so an operator sees a client at its limit.
    streams_refused: int = 0

    def __post_init__(self) -> None:
        if self.kind.publishes_port != (self.port is not None):
            raise ValueError(f"{self.kind} tunnel {self.key} with port {self.port!r}")

    @classmethod
    def public_tcp(cls, client: str, port: int, mode: TunnelMode, target: str) -> Tunnel:
        return cls(TunnelKey.public_tcp(client, port), TunnelKind.PUBLIC_TCP, target, mode,
                   port)

    @property
    def client(self) -> str:
        return self.key.client

    @property
    def state(self) -> TunnelState:
        return TunnelState.LIVE if self.link is not None else TunnelState.WAITING


@dataclass(frozen=True, slots=True)
class Claim:
    """What one ``expose`` asks for, as the binding of its kind reads it.

    Identity comes from the login, never from the message: ``client`` is the link's name.
    """

    client: str
    kind: TunnelKind
    #: The client's local service, ``"host:port"``.
    target: str
    #: ``fixed`` or ``auto`` as the client sent it; checked by the binding.
    mode: str
    #: The public port asked for (``fixed``); None when the relay picks or the kind has none.
    port: int | None


class Binding(Protocol):
    """What one kind needs outside the registry (a port, a route), claimed and released.

    ``claim`` returns the tunnel the claim made or refreshed, already in the registry but not
    yet routed; it raises :class:`~tunnel.common.errors.ClaimRefused` with the reason the
    client is told. Claims are serialised by the caller.
    """

    @property
    def kind(self) -> TunnelKind: ...

    async def claim(self, claim: Claim) -> Tunnel: ...

    async def release_client(self, client: str) -> None:
        """Free everything ``client`` holds (the client was removed from the config)."""
        ...

    def close(self) -> None:
        """Stop accepting visitors (relay shutdown); leases stay."""
        ...
