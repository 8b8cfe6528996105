"""The PUBLIC_TCP binding over real sockets: leases become bound ports, and back.

The lease book runs over a memory store and a hand-moved clock; only the ports are real
(127.0.0.1, taken from the test port pool, never fixed numbers).
"""

from __future__ import annotations

import socket

import pytest

from tests.e2e.ports import free_ports
from tunnel.common.errors import ClaimRefused
from tunnel.common.proto.portset import PortSet
from tunnel.server.guard import SourceSlots
from tunnel.server.leases import LeaseBook, MemoryLeaseStore
from tunnel.server.public_tcp import PublicTcp
from tunnel.server.registry import Registry
from tunnel.server.tunnels import Claim, TunnelKind, TunnelState

HOST = "127.0.0.1"
TTL = 100.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def binding(ports: PortSet, book: LeaseBook, registry: Registry) -> PublicTcp:
    return PublicTcp(registry, book, HOST, ports, dict, SourceSlots(8, 64), None)


def auto(client: str, target: str = "127.0.0.1:80") -> Claim:
    return Claim(client, TunnelKind.PUBLIC_TCP, target, "auto", None)


def is_bound(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return True
    return False


async def test_a_claim_binds_its_port_and_a_release_frees_it() -> None:
    (port,) = free_ports(1)
    registry, clock = Registry(), Clock()
    book = await LeaseBook.open(MemoryLeaseStore(), PortSet.of(port), lambda _: PortSet.of(port),
                                clock=clock)
    public = binding(PortSet.of(port), book, registry)
    tunnel = await public.claim(auto("alpha"))
    try:
        assert (tunnel.port, tunnel.state, tunnel.mode) == (port, TunnelState.WAITING, "auto")
        assert registry.by_port[port] is tunnel and public.serving(port) is tunnel
        assert is_bound(port)
    finally:
        assert await public.release(port) is not None
    assert not is_bound(port)
    assert dict(registry.by_port) == {} and public.serving(port) is None


async def test_a_port_that_changes_hands_admits_visitors_to_its_new_owner() -> None:
    (port,) = free_ports(1)
    registry, clock = Registry(), Clock()
    book = await LeaseBook.open(MemoryLeaseStore(), PortSet.of(port), lambda _: PortSet.of(port),
                                clock=clock, auto_ttl=TTL)
    public = binding(PortSet.of(port), book, registry)
    old = await public.claim(auto("alpha"))
    try:
        clock.now += TTL + 1  # alpha stayed offline past the TTL: its lease is reclaimable
        new = await public.claim(auto("beta"))
        assert new.client == "beta" and new.port == port
        assert public.serving(port) is new
        assert old.key not in registry.tunnels
    finally:
        public.close()


async def test_a_port_held_by_another_program_is_refused_and_not_leased() -> None:
    (port,) = free_ports(1)
    registry, clock = Registry(), Clock()
    book = await LeaseBook.open(MemoryLeaseStore(), PortSet.of(port), lambda _: PortSet.of(port),
                                clock=clock)
    public = binding(PortSet.of(port), book, registry)
    with socket.socket() as squatter:
        squatter.bind((HOST, port))
        squatter.listen()
        claim = Claim("alpha", TunnelKind.PUBLIC_TCP, "127.0.0.1:80", "fixed", port)
        with pytest.raises(ClaimRefused, match="another program"):
            await public.claim(claim)
    assert book.leases() == [] and dict(registry.tunnels) == {}


async def test_restore_keeps_the_leases_of_unconfigured_clients() -> None:
    """A client missing from the config at start-up (a hand edit, an empty clients file)
    keeps its ports reserved and bound like an offline owner's; only a release frees them."""
    kept, orphan = free_ports(2)
    ports = PortSet.of(kept, orphan)
    store, clock = MemoryLeaseStore(), Clock()
    book = await LeaseBook.open(store, ports, lambda _: ports, clock=clock)
    await book.claim_fixed("alpha", kept, "127.0.0.1:22")
    await book.claim_fixed("gone", orphan, "127.0.0.1:22")
    registry = Registry()
    restarted = await LeaseBook.open(store, ports, lambda _: ports, clock=clock)
    public = binding(ports, restarted, registry)
    await public.restore({"alpha"})
    try:
        assert set(public.bound) == {kept, orphan}
        assert sorted(t.client for t in registry.by_port.values()) == ["alpha", "gone"]
        assert sorted(lease.port for lease in await store.load()) == sorted([kept, orphan])
    finally:
        public.close()


async def test_fixed_with_no_port_is_refused_as_such_and_leases_nothing() -> None:
    (port,) = free_ports(1)
    book = await LeaseBook.open(MemoryLeaseStore(), PortSet.of(port), lambda _: PortSet.of(port),
                                clock=Clock())
    public = binding(PortSet.of(port), book, Registry())
    with pytest.raises(ClaimRefused) as info:
        await public.claim(Claim("alpha", TunnelKind.PUBLIC_TCP, "127.0.0.1:80", "fixed", None))
    assert info.value.port is None
    assert info.value.reason.startswith("fixed needs a port"), info.value.reason
    assert book.leases() == [] and not is_bound(port)


@pytest.mark.parametrize("where", ["outside the relay's ports", "another client's port"])
async def test_a_refusal_names_only_the_ports_the_refused_client_may_use(where: str) -> None:
    """The relay's ports hold alpha's and beta's grants; refusing alpha must not tell it
    which ports beta was given."""
    mine, theirs, outside = free_ports(3)
    relay_ports = PortSet.of(mine, theirs)
    grants = {"alpha": PortSet.of(mine), "beta": PortSet.of(theirs)}
    book = await LeaseBook.open(MemoryLeaseStore(), relay_ports, grants.__getitem__,
                                clock=Clock())
    public = binding(relay_ports, book, Registry())
    asked = outside if where == "outside the relay's ports" else theirs
    with pytest.raises(ClaimRefused) as info:
        await public.claim(Claim("alpha", TunnelKind.PUBLIC_TCP, "127.0.0.1:80", "fixed", asked))
    reason = info.value.reason
    assert str(mine) in reason and str(theirs) not in reason.replace(f"port {asked} ", ""), reason
    assert book.leases() == [] and not is_bound(asked)
