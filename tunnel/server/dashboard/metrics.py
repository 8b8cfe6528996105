"""Prometheus metrics read from the relay's live counters at scrape time.

A custom collector on a private registry (not the process-global one, so nothing else in
the process leaks into the scrape and two relays in one test process do not collide):
values are taken from the registry's byte counters when ``/metrics`` is fetched, so they
move while bytes flow, with no second set of counters to keep in step. Labels carry only
client names (configured by the operator) and port numbers; GPU figures come from the
cleaned telemetry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tunnel import __version__
from tunnel.server.dashboard.relayview import ClientView, RelayView
from tunnel.server.dashboard.telemetry import clean_telemetry

__all__ = ["RelayCollector", "RelayMetrics"]

_GPU_GAUGES = (
    ("utilization", "tunnel_client_gpu_utilization_percent", "GPU utilization (percent)"),
    ("memory_used", "tunnel_client_gpu_memory_used_bytes", "GPU memory in use"),
    ("memory_total", "tunnel_client_gpu_memory_total_bytes", "GPU memory size"),
    ("temperature", "tunnel_client_gpu_temperature_celsius", "GPU temperature"),
    ("power_watts", "tunnel_client_gpu_power_watts", "GPU power draw"),
)
_HOST_GAUGES = (
    ("cpu_percent", "tunnel_client_cpu_percent", "CPU utilization of the client's host"),
    ("memory_used", "tunnel_client_memory_used_bytes", "memory in use on the client's host"),
    ("memory_total", "tunnel_client_memory_total_bytes", "memory size of the client's host"),
)


class RelayCollector(Collector):
    def __init__(self, relay: RelayView, clock: Callable[[], float]) -> None:
        self._relay = relay
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        yield from self._relay_metrics()
        yield from self._client_metrics()
        yield from self._tunnel_metrics()
        yield from self._telemetry_metrics()

    def _relay_metrics(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("tunnel_relay_info", "relay version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily("tunnel_relay_uptime_seconds", "seconds since the relay started",
                                value=max(0.0, self._clock() - self._relay.started))
        clients = self._relay.registry.clients.values()
        yield GaugeMetricFamily("tunnel_clients_online", "clients with a live link",
                                value=sum(1 for c in clients if c.link is not None))
        yield GaugeMetricFamily("tunnel_clients_configured", "configured clients",
                                value=len(clients))
        yield CounterMetricFamily("tunnel_relay_protocol_errors", "links closed because the "
                                  "peer broke the wire protocol",
                                  value=self._relay.counters.protocol_errors)
        yield CounterMetricFamily("tunnel_relay_stray_frames", "frames drained for streams "
                                  "already gone", value=self._relay.counters.stray_frames)

    def _client_metrics(self) -> Iterator[Metric]:
        online = GaugeMetricFamily("tunnel_client_online", "1 while the client is connected",
                                   labels=["client"])
        rtt = GaugeMetricFamily("tunnel_client_rtt_seconds", "heartbeat round-trip time",
                                labels=["client"])
        b_in = CounterMetricFamily("tunnel_client_bytes_in", "bytes from visitors to the "
                                   "client, all its tunnels", labels=["client"])
        b_out = CounterMetricFamily("tunnel_client_bytes_out", "bytes from the client to "
                                    "visitors, all its tunnels", labels=["client"])
        refused = CounterMetricFamily("tunnel_client_streams_refused", "visitor streams "
                                      "reset at once because the client's stream limit or "
                                      "the per-source cap was reached", labels=["client"])
        totals: dict[str, list[int]] = {name: [0, 0, 0] for name in self._relay.registry.clients}
        for tunnel in self._relay.registry.by_port.values():
            sums = totals.setdefault(tunnel.client, [0, 0, 0])
            sums[0] += tunnel.traffic.bytes_in
            sums[1] += tunnel.traffic.bytes_out
            sums[2] += tunnel.streams_refused
        for name, client in sorted(self._relay.registry.clients.items()):
            online.add_metric([name], 1 if client.link is not None else 0)
            if client.link is not None and client.link.rtt is not None:
                rtt.add_metric([name], client.link.rtt)
        for name, (total_in, total_out, total_refused) in sorted(totals.items()):
            b_in.add_metric([name], total_in)
            b_out.add_metric([name], total_out)
            refused.add_metric([name], total_refused)
        yield from (online, rtt, b_in, b_out, refused)

    def _tunnel_metrics(self) -> Iterator[Metric]:
        labels = ["client", "port"]
        b_in = CounterMetricFamily("tunnel_tunnel_bytes_in", "bytes from visitors into the "
                                   "tunnel", labels=labels)
        b_out = CounterMetricFamily("tunnel_tunnel_bytes_out", "bytes from the tunnel out to "
                                    "visitors", labels=labels)
        streams = CounterMetricFamily("tunnel_tunnel_streams", "visitor connections accepted",
                                      labels=labels)
        conns = GaugeMetricFamily("tunnel_tunnel_connections", "open visitor connections",
                                  labels=labels)
        up = GaugeMetricFamily("tunnel_tunnel_online", "1 while the tunnel is live",
                               labels=labels)
        refused = CounterMetricFamily("tunnel_tunnel_streams_refused", "visitor connections "
                                      "reset at once (stream limit or per-source cap)",
                                      labels=labels)
        for port, tunnel in sorted(self._relay.registry.by_port.items()):
            values = [tunnel.client, str(port)]
            b_in.add_metric(values, tunnel.traffic.bytes_in)
            b_out.add_metric(values, tunnel.traffic.bytes_out)
            streams.add_metric(values, tunnel.traffic.streams_total)
            conns.add_metric(values, len(tunnel.connections))
            up.add_metric(values, 1 if tunnel.link is not None else 0)
            refused.add_metric(values, tunnel.streams_refused)
        yield from (b_in, b_out, streams, conns, up, refused)

    def _telemetry_metrics(self) -> Iterator[Metric]:
        host = {key: GaugeMetricFamily(name, doc, labels=["client"])
                for key, name, doc in _HOST_GAUGES}
        gpu = {key: GaugeMetricFamily(name, doc, labels=["client", "gpu"])
               for key, name, doc in _GPU_GAUGES}
        for name, client in sorted(self._relay.registry.clients.items()):
            _add_telemetry(client, name, host, gpu)
        yield from host.values()
        yield from gpu.values()


def _add_telemetry(client: ClientView, name: str, host: dict[str, GaugeMetricFamily],
                   gpu: dict[str, GaugeMetricFamily]) -> None:
    """Only for connected clients: a dead box's last GPU load is not its current one."""
    telemetry = clean_telemetry(client.telemetry, client.telemetry_at)
    if telemetry is None or client.link is None:
        return
    for key, family in host.items():
        if telemetry.get(key) is not None:
            family.add_metric([name], telemetry[key])
    for card in telemetry["gpus"]:
        for key, family in gpu.items():
            if card.get(key) is not None:
                family.add_metric([name, str(card["index"])], card[key])


class RelayMetrics:
    """A private registry holding only the relay collector."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, relay: RelayView, clock: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RelayCollector(relay, clock))

    def render(self) -> bytes:
        return generate_latest(self.registry)
