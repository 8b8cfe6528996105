"""The PUBLIC_TCP kind's binding: a leased port on the relay's public address.

This is the one place that knows a tunnel may need a port: it turns a claim into a lease
(:mod:`tunnel.server.leases`), keeps the leased port bound (:mod:`tunnel.server.listeners`)
and places the tunnel in the registry under its key. A port stays bound for as long as its
lease exists, also while the owner is offline, so no other program can take it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping

from tunnel.common.errors import ClaimRefused
from tunnel.common.proto.portset import PortSet
from tunnel.server.acceptor import Acceptor
from tunnel.server.guard import OpenRate, SourceSlots, claim_refusal
from tunnel.server.leases import Lease, LeaseBook
from tunnel.server.listeners import VisitorGate, bind_public_port, port_is_free
from tunnel.server.registry import Registry
from tunnel.server.tunnels import Claim, Tunnel, TunnelKind

__all__ = ["PublicTcp"]

log = logging.getLogger("tunnel.server")


class PublicTcp:
    """Leases, binds and releases public TCP ports; one per relay.

    Invariant: every port in ``bound`` has a lease, and its gate admits visitors to the
    registry's tunnel on that port (when the port changes hands, the gate follows).
    """

    kind = TunnelKind.PUBLIC_TCP

    def __init__(self, registry: Registry, leases: LeaseBook, host: str, relay_ports: PortSet,
                 reserved: Callable[[], Mapping[int, str]], slots: SourceSlots,
                 rate: OpenRate | None) -> None:
        self._registry = registry
        self._leases = leases
        self._host = host
        self._relay_ports = relay_ports
        #: The relay's own listening ports (as bound), which no tunnel may take.
        self._reserved = reserved
        self._slots = slots
        self._rate = rate
        self._bound: dict[int, tuple[Acceptor, VisitorGate]] = {}

    @property
    def bound(self) -> Collection[int]:
        return self._bound.keys()

    def serving(self, port: int) -> Tunnel | None:
        """The tunnel whose visitors the listener on ``port`` admits, if it is bound."""
        held = self._bound.get(port)
        return held[1].tunnel if held is not None else None

    # ------------------------------------------------------------ claims

    async def claim(self, claim: Claim) -> Tunnel:
        """Lease a port for ``claim`` (the same as last time where possible) and bind it."""
        lease, created = await self._lease(claim)
        tunnel = self._registry.place(
            Tunnel.public_tcp(claim.client, lease.port, lease.kind, claim.target))
        tunnel.mode, tunnel.target = lease.kind, claim.target
        try:
            await self._bind(tunnel)
        except OSError as exc:
            self._registry.drop(tunnel.key)
            if created:
                await self._leases.release(lease.port)
            raise ClaimRefused(lease.port, "already in use by another program on the relay"
                               f" ({exc.strerror or exc})") from exc
        return tunnel

    async def _lease(self, claim: Claim) -> tuple[Lease, bool]:
        reserved = self._reserved()
        ranges = self._relay_ports.ranges
        port = claim.port
        if claim.mode == "fixed" and port is None:
            raise ClaimRefused(None, "fixed needs a port (or ask for mode auto)")
        if claim.mode == "fixed" and isinstance(port, int):
            refusal = claim_refusal(port, ranges, reserved)
            if refusal is not None:
                raise ClaimRefused(port, refusal)
            return await self._leases.claim_fixed(claim.client, port, claim.target)
        if claim.mode == "auto":
            def usable(candidate: int) -> bool:
                if claim_refusal(candidate, ranges, reserved) is not None:
                    return False
                return candidate in self._bound or port_is_free(self._host, candidate)
            return await self._leases.claim_auto(claim.client, claim.target, usable)
        raise ClaimRefused(port, f"unknown mode {claim.mode[:16]!r}: expected fixed or auto")

    async def _bind(self, tunnel: Tunnel) -> None:
        """Admit visitors on the tunnel's port to it; raises OSError if the port is taken."""
        assert tunnel.port is not None  # Tunnel.public_tcp always sets it
        held = self._bound.get(tunnel.port)
        if held is not None:
            held[1].tunnel = tunnel
            return
        gate = VisitorGate(tunnel, self._slots, self._rate)
        self._bound[tunnel.port] = (await bind_public_port(self._host, gate), gate)

    # ------------------------------------------------------------ start-up

    async def restore(self, configured: Collection[str]) -> None:
        """Bind every leased port from the start, owner online or not.

        Leases of clients no longer in ``configured`` are kept and bound like those of an
        offline owner: only an explicit release (``remove-client``, the status page) frees
        a port, never a config file that lost an entry or looks empty. Leases outside the
        relay's ports stay (a config edit may bring the range back) but are not bound.
        """
        for lease in self._leases.leases():
            if lease.client not in configured:
                log.warning("port %d stays reserved for client %s, which is not configured; "
                            "remove-client or the status page releases it", lease.port,
                            lease.client)
            if lease.port not in self._relay_ports:
                log.warning("lease of port %d (client %s) is outside `ports`: not bound",
                            lease.port, lease.client)
                continue
            tunnel = self._registry.place(
                Tunnel.public_tcp(lease.client, lease.port, lease.kind, lease.target))
            try:
                await self._bind(tunnel)
            except OSError as exc:
                log.warning("cannot bind leased port %d (client %s): %s", lease.port,
                            lease.client, exc.strerror or exc)
                self._registry.drop(tunnel.key)

    # ------------------------------------------------------------ releases

    async def release(self, port: int) -> Lease | None:
        """Forget the lease on ``port``, unbind it and reset its visitors."""
        lease = await self._leases.release(port)
        if lease is None:
            return None
        held = self._bound.pop(port, None)
        if held is not None:
            held[0].close()
        tunnel = self._registry.by_port.get(port)
        if tunnel is not None:
            self._registry.drop(tunnel.key)
            for sock in list(tunnel.connections):
                sock.abort()
        return lease

    def close(self) -> None:
        for acceptor, _gate in self._bound.values():
            acceptor.close()
