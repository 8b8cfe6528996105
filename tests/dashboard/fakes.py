"""A fake relay with the shape :mod:`tunnel.server.dashboard.relayview` describes.

Unit tests drive the dashboard against it without starting a relay; every field is plain
data the test sets, and the admin actions record their calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunnel.common.proto.secret import Secret
from tunnel.server.config_dashboard import AlertSettings, DashboardSettings
from tunnel.server.stats import LinkCounters

PASSWORD = "correct-horse-battery-staple"


@dataclass
class FakeLink:
    rtt: float | None = 0.012


@dataclass
class FakeTraffic:
    bytes_in: int = 0
    bytes_out: int = 0
    streams_total: int = 0
    streams_open: int = 0


@dataclass(eq=False)
class FakeConnection:
    peer: str
    opened: float
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class FakeTunnel:
    port: int
    client: str
    mode: str = "fixed"
    target: str = "127.0.0.1:8888"
    traffic: FakeTraffic = field(default_factory=FakeTraffic)
    link: FakeLink | None = None
    connections: set[FakeConnection] = field(default_factory=set)
    streams_refused: int = 0


@dataclass
class FakeClient:
    name: str
    link: FakeLink | None = None
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
    replacements: int = 0

    def replacement_rate(self, now: float, /) -> int:
        return self.replacements


@dataclass
class FakeRegistry:
    clients: dict[str, FakeClient] = field(default_factory=dict)
    by_port: dict[int, FakeTunnel] = field(default_factory=dict)


class FakeStats:
    def rate(self, key: tuple[object, ...]) -> tuple[float, float]:
        return (100.0, 200.0) if key[0] == "tunnel" else (10.0, 20.0)

    def series(self, key: tuple[object, ...]) -> list[tuple[float, float, float]]:
        return [(1000.0, 1.0, 2.0), (1005.0, 3.0, 4.0)]


@dataclass
class FakeHistory:
    calls: list[tuple[str | None, int | None, float]] = field(default_factory=list)

    def query(self, client: str | None, port: int | None,
              since: float) -> list[tuple[float, int, int]]:
        self.calls.append((client, port, since))
        return [(960.0, 10, 20), (1020.0, 30, 40)]


@dataclass(frozen=True)
class FakeLease:
    port: int
    client: str
    kind: str
    target: str
    created: float
    last_seen: float


@dataclass
class FakeLeases:
    items: list[FakeLease] = field(default_factory=list)
    online: set[str] = field(default_factory=set)

    def leases(self) -> list[FakeLease]:
        return list(self.items)

    def is_online(self, name: str) -> bool:
        return name in self.online


@dataclass
class FakeConfig:
    dashboard: DashboardSettings | None = None
    alerts: AlertSettings | None = None


@dataclass
class FakeRelay:
    config: FakeConfig = field(default_factory=FakeConfig)
    registry: FakeRegistry = field(default_factory=FakeRegistry)
    stats: FakeStats = field(default_factory=FakeStats)
    counters: LinkCounters = field(default_factory=LinkCounters)
    history: FakeHistory = field(default_factory=FakeHistory)
    leases: FakeLeases = field(default_factory=FakeLeases)
    started: float = 1000.0
    presence_listeners: list[Callable[[str, bool], None]] = field(default_factory=list)
    disconnected: list[str] = field(default_factory=list)
    released: list[int] = field(default_factory=list)

    def disconnect_client(self, name: str) -> bool:
        record = self.registry.clients.get(name)
        if record is None or record.link is None:
            return False
        record.link = None
        self.disconnected.append(name)
        return True

    async def release_lease(self, port: int) -> bool:
        before = len(self.leases.items)
        self.leases.items = [item for item in self.leases.items if item.port != port]
        self.released.append(port)
        return len(self.leases.items) < before


def settings(*, host: str = "127.0.0.1", password: str | None = PASSWORD,
             password_hash: str | None = None,
             hosts: tuple[str, ...] = ()) -> DashboardSettings:
    return DashboardSettings(host, 0, "admin", Secret(password) if password else None,
                             password_hash, hosts)


def sample_relay() -> FakeRelay:
    """alpha online with one tunnel and one visitor; beta offline with a leased port."""
    relay = FakeRelay(config=FakeConfig(dashboard=settings()))
    link = FakeLink()
    relay.registry.clients["alpha"] = FakeClient(
        "alpha", link, "127.0.0.1:5555", "0.1.0", 1100.0, 1190.0, None, 2,
        "gpu-box", "Linux", {
            "hostname": "gpu-box<script>", "os": "Linux", "cpu_percent": 12.5,
            "memory_used": 1 << 30, "memory_total": 4 << 30, "gpu_status": "ok",
            "secret_field": "x", "gpus": [
                {"index": 0, "name": "H100", "utilization": 87.0, "memory_used": 1 << 33,
                 "memory_total": 80 << 30, "temperature": 61, "power_watts": 350.5},
                {"index": "bad"},
            ]}, 1195.0)
    relay.registry.clients["beta"] = FakeClient("beta", None, offline_since=1050.0,
                                                last_seen=1050.0)
    conn = FakeConnection("10.0.0.9:4444", 1180.0, 111, 222)
    relay.registry.by_port[6000] = FakeTunnel(
        6000, "alpha", traffic=FakeTraffic(5000, 7000, 3, 1), link=link,
        connections={conn})
    relay.registry.by_port[6001] = FakeTunnel(6001, "beta", mode="auto",
                                              target="127.0.0.1:22")
    relay.leases.items = [FakeLease(6000, "alpha", "fixed", "127.0.0.1:8888", 900.0, 1190.0),
                          FakeLease(6001, "beta", "auto", "127.0.0.1:22", 800.0, 1050.0)]
    relay.leases.online = {"alpha"}
    return relay
