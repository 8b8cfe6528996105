"""Reliability catalogue (../shared/design/reliability.md §2), section (f) load, by id.

Every test runs the real relay and client programs, moves checksummed bytes through them with
the raw-socket load generator (tests/e2e/loadgen.py) and reads the programs' RSS and fd
counts from /proc. Memory bounds are on growth over a baseline taken after a warm-up echo
(absolute RSS is noisy); the relay's open-stream count comes from its dashboard API.

Sizing on this machine: RLIMIT_NOFILE is 20000 per process and each tunneled connection
costs ~4 fds across the processes (the visitor and the echo service both live in the test
process, so it holds 2 per connection); the relay allows 256 open visitors per source IP
(B-9), so loads above that spread over 127.0.0.2, 127.0.0.3, ...
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard.client import basic, request
from tests.e2e.conftest import Size
from tests.e2e.harness import (
    ALPHA_TOKEN,
    Proc,
    Variant,
    free_ports,
    server_config,
    start_client,
    start_server,
    wait_tunnel,
)
from tests.e2e.loadgen import (
    LoadEchoService,
    MemorySampler,
    Visitor,
    churn,
    describe_failures,
    fds,
    gather_limited,
    percentile,
    rss,
    settle,
    source_for,
)
from tests.e2e.services import echo_check

KIB = 1024
MIB = 1024 * KIB
DASHBOARD_RE = r"^tunnel-server: dashboard on (?P<url>http://\S+)$"
#: Connects the load generator keeps in flight: well below the relay's listen backlog (512),
#: well above the client's 64 local dials in flight, so the dialer's queue is exercised.
CONNECT_CONCURRENCY = 200
CLEAN_WITHIN = 5.0  # the catalogue's "clean": within 5 s after the test
FD_SLACK = 2


@dataclass
class Relay:
    proc: Proc
    url: str
    dashboard: int
    password: str

    async def api(self, path: str) -> Any:
        reply = await request(self.dashboard, "GET", path, auth=basic("admin", self.password))
        assert reply.status == 200, (path, reply)
        return reply.json()

    async def open_streams(self) -> int:
        status = await self.api("/api/status")
        return int(status["connections"])


async def start_relay(tmp_path: Path, ports: Sequence[int], **overrides: Any) -> Relay:
    """The relay with its dashboard on (to read open streams and clients) and ``overrides``."""
    password = secrets.token_urlsafe(15)
    dashboard = {"listen": "127.0.0.1:0", "username": "admin", "password": password}
    config = server_config(tmp_path, ports, dashboard=dashboard, **overrides)
    proc, url = await start_server(tmp_path, config)
    dash = await proc.wait_for_line(DASHBOARD_RE)
    return Relay(proc, url, int(dash["url"].rsplit(":", 1)[1].rstrip("/")), password)


async def echo_tunnel(tmp_path: Path, **overrides: Any) -> tuple[Relay, Proc, int, LoadEchoService]:
    """Relay + client alpha exposing an echo service on one fixed port, warmed up."""
    echo = LoadEchoService()
    await echo.start()
    (port,) = free_ports(1)
    relay = await start_relay(tmp_path, [port], **overrides)
    client = await start_client(relay.url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
    assert await wait_tunnel(client, echo.target, mode="fixed") == port
    await echo_check(port, size=256 * KIB)  # warm-up: first-use allocations are not growth
    return relay, client, port, echo


def mib(kib: int) -> float:
    return kib / 1024.0


async def assert_clean(relay: Relay, pids: Mapping[str, int],
                       base_fds: Mapping[str, int]) -> dict[str, int]:
    """The catalogue's "clean": within 5 s, 0 open streams and fds back to baseline +-2.

    Task counts are not exposed by the programs; fds stand for the sockets that tasks and
    streams would hold. Returns the fd counts at the end.
    """
    last: dict[str, int] = {}

    async def check() -> bool:
        nonlocal last
        last = fds(dict(pids))
        if any(abs(last[name] - base_fds[name]) > FD_SLACK for name in pids):
            return False
        return await relay.open_streams() == 0

    ok = await settle(check, CLEAN_WITHIN)
    streams = await relay.open_streams()
    assert ok, (f"not clean within {CLEAN_WITHIN} s: {streams} open streams, fds {last} vs "
                f"baseline {dict(base_fds)}")
    return last


def report(test: str, **figures: object) -> None:
    """Print the measured figures (shown with pytest -s, kept in the -rA summary)."""
    text = ", ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\n[{test}] {text}")


# ----------------------------------------------------------------------------- L-1


L1_MAX_STREAMS = 1100  # N raised from 256: the catalogue holds 1000 streams open at once


@pytest.mark.timeout(600)
async def test_L1_concurrent_echo_connections(tmp_path: Path, variant: Variant,
                                              size: Size) -> None:
    """1000 concurrent echo connections through one port, 1 MiB each with a digest (fast:
    200 x 256 KiB): 100 % succeed, p99 connect time < 500 ms, each program's RSS <= baseline
    + 150 MiB, clean afterwards.

    Connect time is measured from the connect() call to the echo of a 12-byte probe (time to
    first echoed byte): the relay's kernel completes the TCP handshake before the tunnel does
    anything, so only an echo shows the stream was opened, dialed by the client and answered.
    The visitors connect with 200 connects in flight (below the relay's listen backlog of
    512, above the client's 64 local dials, so the client's dial queue is used); once all are
    open at the same time, all send and read their bulk echo at once.

    Config: the relay's ``max_streams`` (N) is raised to 1100 so 1000 streams fit one link.
    """
    count, each = size.pick((200, 256 * KIB), (1000, MIB))
    relay, client, port, _ = await echo_tunnel(tmp_path, max_streams=L1_MAX_STREAMS)
    pids = {"relay": relay.proc.pid, "client": client.pid}
    base_rss, base_fds = rss(pids), fds(pids)

    with MemorySampler(pids) as memory:
        opened = await gather_limited(
            [lambda i=i: Visitor.open(port, i, source_for(i)) for i in range(count)],
            CONNECT_CONCURRENCY)
        visitors = [v for v in opened if isinstance(v, Visitor)]
        try:
            assert len(visitors) == count, describe_failures(opened)
            assert await relay.open_streams() == count  # all of them open at once
            echoed = await asyncio.gather(*(v.echo(each, seed=v.ident) for v in visitors),
                                          return_exceptions=True)
        finally:
            await asyncio.gather(*(v.close() for v in visitors))
    failures = describe_failures(echoed)
    assert not failures, failures

    connect_times = [v.connect_s for v in visitors]
    p99 = percentile(connect_times, 99)
    growth = {name: mib(memory.peak[name] - base_rss[name]) for name in pids}
    report("L-1", count=count, each_kib=each // KIB, p50_ms=round(
        percentile(connect_times, 50) * 1000, 1), p99_ms=round(p99 * 1000, 1),
        rss_growth_mib={k: round(v, 1) for k, v in growth.items()})
    assert p99 < 0.5, f"p99 connect time {p99 * 1000:.0f} ms"
    for name, grown in growth.items():
        assert grown <= 150, f"{name} RSS grew {grown:.1f} MiB over its baseline"
    await assert_clean(relay, pids, base_fds)
