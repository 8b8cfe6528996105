"""The refused-streams counter (reliability F-5: "refusals are counted on the dashboard").

A visitor refused at the stream limit or the per-source cap is reset at once; the relay
counts it on the tunnel record, and the JSON views and /metrics show it per tunnel and
summed per client, so an operator can tell a client that sits at its limit.
"""

from __future__ import annotations

from tests.dashboard.fakes import FakeTunnel, sample_relay
from tunnel.server.dashboard.metrics import RelayMetrics
from tunnel.server.dashboard.views import client_summary


def test_refusals_show_per_tunnel_and_summed_per_client() -> None:
    relay = sample_relay()
    relay.registry.by_port[6000].streams_refused = 4
    relay.registry.by_port[6002] = FakeTunnel(6002, "alpha", streams_refused=3)
    alpha = client_summary(relay, relay.registry.clients["alpha"], now=0.0)
    assert alpha["streams_refused"] == 7
    assert [t["streams_refused"] for t in alpha["tunnels"]] == [4, 3]
    beta = client_summary(relay, relay.registry.clients["beta"], now=0.0)
    assert beta["streams_refused"] == 0


def test_refusals_are_prometheus_counters() -> None:
    relay = sample_relay()
    relay.registry.by_port[6000].streams_refused = 4
    lines = RelayMetrics(relay, lambda: 1200.0).render().decode().splitlines()
    assert 'tunnel_client_streams_refused_total{client="alpha"} 4.0' in lines
    assert 'tunnel_client_streams_refused_total{client="beta"} 0.0' in lines
    assert 'tunnel_tunnel_streams_refused_total{client="alpha",port="6000"} 4.0' in lines
    assert '# TYPE tunnel_client_streams_refused_total counter' in lines
