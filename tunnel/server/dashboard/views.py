"""The relay's live state as JSON-ready values (snake_case keys, epoch-second floats).

Pure functions of a :class:`RelayView` and a time ``now``, so they are easy to test and
never change state. Everything a client reported about itself (host name, OS, telemetry,
GPU names) is untrusted: it is passed through :mod:`.telemetry`, which keeps only known
keys with bounded strings and finite numbers; the page must still render it as text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tunnel import __version__
from tunnel.server.dashboard.relayview import (
    ClientView,
    LeaseView,
    RelayView,
    TrafficView,
    TunnelView,
)
from tunnel.server.dashboard.telemetry import clean_telemetry, clean_text
from tunnel.server.registry import REPLACEMENT_FLAG

__all__ = [
    "client_detail",
    "client_summary",
    "connections",
    "leases",
    "status",
]

Json = dict[str, Any]


def _pair(values: tuple[float, float]) -> Json:
    return {"in": values[0], "out": values[1]}


def _bytes(traffic: Iterable[TrafficView]) -> Json:
    total_in = total_out = 0
    for item in traffic:
        total_in += item.bytes_in
        total_out += item.bytes_out
    return {"in": total_in, "out": total_out}


def tunnels_of(relay: RelayView, name: str) -> list[tuple[int, TunnelView]]:
    """The client's public tunnels as (port, tunnel), by port."""
    return sorted((item for item in relay.registry.by_port.items() if item[1].client == name),
                  key=lambda item: item[0])


def _tunnel(relay: RelayView, port: int, tunnel: TunnelView) -> Json:
    return {
        "port": port,
        "mode": tunnel.mode,
        "target": clean_text(tunnel.target),
        "online": tunnel.link is not None,
        "connections": len(tunnel.connections),
        "streams_refused": tunnel.streams_refused,
        "traffic": _bytes([tunnel.traffic]),
        "rate": _pair(relay.stats.rate(("tunnel", port))),
    }


def client_summary(relay: RelayView, client: ClientView, now: float) -> Json:
    tunnels = tunnels_of(relay, client.name)
    replaced = client.replacement_rate(now)
    link = client.link
    rtt = link.rtt if link is not None else None
    return {
        "name": client.name,
        "online": link is not None,
        "connected_since": client.connected_since,
        "offline_since": client.offline_since,
        "last_seen": client.last_seen,
        "logins": client.logins,
        # Two machines sharing one identity replace each other; flagged at the relay's
        # throttling threshold (reliability S-7).
        "replacements_last_minute": replaced,
        "flapping": replaced >= REPLACEMENT_FLAG,
        "address": clean_text(client.address),
        "version": clean_text(client.version),
        "hostname": clean_text(client.hostname) or None,
        "os": clean_text(client.os) or None,
        "rtt_ms": round(rtt * 1000.0, 3) if rtt is not None else None,
        "traffic": _bytes(t.traffic for _, t in tunnels),
        "streams_refused": sum(t.streams_refused for _, t in tunnels),
        "rate": _pair(relay.stats.rate(("client", client.name))),
        "tunnels": [_tunnel(relay, port, t) for port, t in tunnels],
        "telemetry": clean_telemetry(client.telemetry, client.telemetry_at),
    }


def _connections(tunnels: Iterable[tuple[int, TunnelView]], now: float) -> list[Json]:
    rows: list[Json] = []
    for port, tunnel in tunnels:
        for conn in tunnel.connections:
            rows.append({
                "client": tunnel.client,
                "port": port,
                "peer": clean_text(conn.peer),
                "opened": conn.opened,
                "duration": max(0.0, now - conn.opened),
                "in": conn.bytes_in,
                "out": conn.bytes_out,
            })
    rows.sort(key=lambda row: (row["port"], row["opened"]))
    return rows


def client_detail(relay: RelayView, client: ClientView, now: float) -> Json:
    view = client_summary(relay, client, now)
    view["connections"] = _connections(tunnels_of(relay, client.name), now)
    view["series"] = [[ts, rin, rout] for ts, rin, rout in
                      relay.stats.series(("client", client.name))]
    return view


def connections(relay: RelayView, now: float) -> list[Json]:
    return _connections(relay.registry.by_port.items(), now)


def _lease(relay: RelayView, lease: LeaseView) -> Json:
    return {
        "port": lease.port,
        "client": lease.client,
        "kind": lease.kind,
        "target": clean_text(lease.target),
        "online": relay.leases.is_online(lease.client),
        "created": lease.created,
        "last_seen": lease.last_seen,
    }


def leases(relay: RelayView) -> list[Json]:
    return [_lease(relay, lease) for lease in relay.leases.leases()]


def status(relay: RelayView, now: float) -> Json:
    clients = relay.registry.clients.values()
    online = sum(1 for c in clients if c.link is not None)
    tunnels = relay.registry.by_port.values()
    return {
        "version": __version__,
        "uptime": max(0.0, now - relay.started),
        "started": relay.started,
        "clients": {"online": online, "offline": len(clients) - online,
                    "total": len(clients)},
        "tunnels": sum(1 for t in tunnels if t.link is not None),
        "connections": sum(len(t.connections) for t in tunnels),
        "rate": _pair(relay.stats.rate(("relay",))),
        "traffic": _bytes(t.traffic for t in tunnels),
        "protocol_errors": relay.counters.protocol_errors,
        "stray_frames": relay.counters.stray_frames,
    }
