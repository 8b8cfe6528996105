"""The tunnel model: kinds, identities and the registry that keys tunnels by identity.

Pure: no sockets, no loop. A link is only ever compared by identity here, so a plain
object stands in for one.
"""

from __future__ import annotations

from typing import cast

import pytest

from tunnel.common.aio.link import Link
from tunnel.server.registry import Registry
from tunnel.server.tunnels import Tunnel, TunnelKey, TunnelKind, TunnelState


def a_link() -> Link:
    return cast(Link, object())


def test_a_public_tcp_tunnel_is_named_after_its_port_within_its_client() -> None:
    tunnel = Tunnel.public_tcp("alpha", 6000, "fixed", "127.0.0.1:22")
    assert tunnel.key == TunnelKey("alpha", "tcp/6000")
    assert tunnel.kind is TunnelKind.PUBLIC_TCP
    assert (tunnel.client, tunnel.port, tunnel.mode) == ("alpha", 6000, "fixed")
    assert TunnelKey.public_tcp("beta", 6000) != tunnel.key


def test_a_kind_that_publishes_a_port_needs_one() -> None:
    assert TunnelKind.PUBLIC_TCP.publishes_port
    with pytest.raises(ValueError):
        Tunnel(TunnelKey("alpha", "ssh"), TunnelKind.PUBLIC_TCP, "127.0.0.1:22", "auto")


@pytest.mark.parametrize(("client", "name"), [("", "tcp/6000"), ("alpha", "")])
def test_a_key_names_both_client_and_tunnel(client: str, name: str) -> None:
    with pytest.raises(ValueError):
        TunnelKey(client, name)


def test_a_tunnel_waits_until_it_is_routed_to_a_link() -> None:
    registry = Registry()
    tunnel = registry.place(Tunnel.public_tcp("alpha", 6000, "auto", "127.0.0.1:80"))
    assert tunnel.state is TunnelState.WAITING
    link = a_link()
    registry.attach("alpha", link, "10.0.0.1", "1.0", now=0.0)
    assert registry.route(tunnel.key, link, 3) is tunnel
    assert (tunnel.state, tunnel.tunnel_id) == (TunnelState.LIVE, 3)
    registry.detach("alpha", link, now=1.0)
    assert tunnel.state is TunnelState.WAITING


def test_placing_a_known_identity_keeps_the_known_tunnel_and_its_counters() -> None:
    registry = Registry()
    first = registry.place(Tunnel.public_tcp("alpha", 6000, "auto", "127.0.0.1:80"))
    first.streams_refused = 2
    again = registry.place(Tunnel.public_tcp("alpha", 6000, "auto", "127.0.0.1:80"))
    assert again is first and again.streams_refused == 2
    assert list(registry.tunnels) == [first.key]


def test_public_tunnels_are_indexed_by_port() -> None:
    registry = Registry()
    a = registry.place(Tunnel.public_tcp("alpha", 6000, "fixed", "127.0.0.1:22"))
    b = registry.place(Tunnel.public_tcp("alpha", 6001, "auto", "127.0.0.1:80"))
    assert dict(registry.by_port) == {6000: a, 6001: b}
    assert registry.tunnels_of("alpha") == [a, b]
    assert registry.drop(a.key) is a
    assert dict(registry.by_port) == {6001: b}
    assert registry.drop(a.key) is None


def test_a_port_that_changes_hands_evicts_its_previous_tunnel() -> None:
    registry = Registry()
    old = registry.place(Tunnel.public_tcp("alpha", 6000, "auto", "127.0.0.1:80"))
    new = registry.place(Tunnel.public_tcp("beta", 6000, "auto", "127.0.0.1:8080"))
    assert registry.by_port[6000] is new
    assert old.key not in registry.tunnels
    assert registry.tunnels_of("alpha") == []


def test_the_port_index_is_read_only() -> None:
    registry = Registry()
    with pytest.raises(TypeError):
        registry.by_port[6000] = Tunnel.public_tcp(  # type: ignore[index]
            "alpha", 6000, "auto", "127.0.0.1:80")


def test_a_replaced_link_leaves_its_tunnels_waiting_for_the_new_one() -> None:
    registry = Registry()
    tunnel = registry.place(Tunnel.public_tcp("alpha", 6000, "auto", "127.0.0.1:80"))
    old, new = a_link(), a_link()
    registry.attach("alpha", old, "10.0.0.1", "1.0", now=0.0)
    registry.route(tunnel.key, old, 0)
    assert registry.attach("alpha", new, "10.0.0.2", "1.0", now=1.0) is old
    assert tunnel.link is None
