"""Reliability catalogue (docs/reliability.md §2), section (b) flow control, by id.

Our stream window W is 1 MiB (``tunnel.common.proto.mux.INITIAL_WINDOW``), not the catalogue's
256 KiB; every bound below is written in terms of our W. Bytes held by the kernel are read
from ``/proc/net/tcp`` (send + receive queues of the sockets on the stream's path), so
"bytes queued in the processes" is what was accepted minus what was read minus those.
"""

from __future__ import annotations

import asyncio
import math
import socket
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Size
from tests.e2e.harness import Variant
from tests.e2e.observe import (
    PeakRss,
    Push,
    RawService,
    Setup,
    abort,
    close_raw_services,
    push_until_blocked,
    raw_connect,
    start_tunnels,
    tcp_queues,
)
from tests.e2e.services import (
    DuplexDigestService,
    EchoService,
    assert_closed_quickly,
    echo_check,
)
from tunnel.common.proto.mux import INITIAL_WINDOW as W

MIB = 1024 * 1024
#: The catalogue's estimate of "W + kernel buffers" for F-2/F-3 on this machine kind; the
#: kernel's own queues alone were measured above it (autotuning, see the tests), so it is
#: reported, and the criterion itself is asserted with the measured kernel queues.
CATALOGUE_ESTIMATE = 16 * MIB
#: The stream's bytes inside relay + client beyond W: one event-loop read (up to 256 KiB)
#: taken from the socket before the window check pauses it, at each end.
READ_SLACK = 512 * 1024
RSS_GROWTH = 16 * MIB
#: F-2/F-3 fix the buffers of the test's own sockets (visitor, service), so the kernel's
#: autotuning of those cannot decide the 16 MiB bound; the tunnel's sockets keep theirs.
TEST_SOCKET_BUFFER = 256 * 1024
#: A sender that made no progress for this long is blocked (there is no event for "never").
STALL = 2.0
#: F-5 full: a reset a stalled socket's kernel did not accept waits for its next
#: zero-window probe (see the test); at the fast size 32 streams never got there.
F5_CLEAN_WITHIN = 30.0
SLOW_READ = 1024  # F-1: stream A's reader takes 1 KiB per second
RTT_P99 = 0.5
SLOWDOWN = 1.25


@pytest.fixture(autouse=True)
async def _raw_cleanup() -> AsyncIterator[None]:
    yield
    await close_raw_services()


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def _local_port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


# ----------------------------------------------------------------------------- F-1


async def _bulk_round(service: DuplexDigestService, port: int, streams: int, size: int,
                      base_id: int) -> float:
    """``streams`` downloads of ``size`` bytes at once; returns their wall time."""
    start = time.monotonic()
    results = await asyncio.gather(*(
        DuplexDigestService.visit(port, base_id + i, 0, size) for i in range(streams)))
    elapsed = time.monotonic() - start
    for _ in range(400):  # the service records its side just after the visitor's ends
        if all(base_id + i in service.results for i in range(streams)):
            break
        await asyncio.sleep(0.025)
    for i, (_, got_len, got_digest) in enumerate(results):
        assert got_len == size, f"stream {base_id + i}: {got_len} of {size} bytes"
        assert got_digest == service.results[base_id + i].sent_digest, base_id + i
    return elapsed


class SlowStream:
    """Stream A: the local service pushes without end, the visitor reads 1 KiB/s."""

    def __init__(self, setup: Setup, service: RawService, port: int) -> None:
        self.setup, self.service, self.port = setup, service, port
        self.sock: socket.socket | None = None
        self.read = 0
        self.push: Push | None = None
        self.service_peer = 0
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        before = len(self.service.conns)
        self.sock = await raw_connect(self.port)
        await self.service.wait_for("A reaches the service",
                                    lambda: len(self.service.conns) > before)
        self.push = self.service.pushes[before]
        self.service_peer = self.service.peers[before]
        self._task = asyncio.create_task(self._read_slowly())
        # A is set up once it is stalled: more than its window went through, and the
        # service's sender then gains less than 64 KiB in half a second (bounded poll:
        # there is no event for "stopped moving").
        last = -1
        for _ in range(60):
            if self.push.accepted > 2 * W and self.push.accepted - last < 64 * 1024:
                return
            last = self.push.accepted
            await asyncio.sleep(0.5)
        raise AssertionError(f"stream A never stalled ({self.push.accepted} bytes accepted)")

    async def _read_slowly(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        for _ in range(3600):
            data = await loop.sock_recv(self.sock, SLOW_READ)
            if not data:
                return
            self.read += len(data)
            await asyncio.sleep(1.0)  # pacing: this reader is slow on purpose

    def queued_in_processes(self) -> int:
        """Bytes of A inside the relay and client: accepted - read - kernel queues."""
        assert self.sock is not None and self.push is not None
        kernel = tcp_queues([(_local_port(self.sock), self.port),
                             (self.service.port, self.service_peer)])
        return self.push.accepted - self.read - kernel

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.sock is not None:
            abort(self.sock)


@pytest.mark.timeout(1800)
async def test_F1_slow_reader_stays_isolated(tmp_path: Path, variant: Variant,
                                             size: Size) -> None:
    """Stream A's visitor reads 1 KiB/s while other streams download (fast: 15 x 8 MiB,
    9 pairs of rounds; full: 63 x 64 MiB, 3 pairs). Pass: the others' time with A stalled
    is within 1.25x of their time without A, as the median over pairs of adjacent rounds
    (order alternating), so that load from other programs on this shared 2-core machine,
    which comes in bursts, does not decide the outcome; bytes of A held by the relay and
    client (accepted by the kernel at the service minus read by the visitor minus the
    kernel queues of A's sockets, from /proc/net/tcp) stay <= 2 x W; the relay's link RTT
    (dashboard ``rtt_ms``, one ping per second) has p99 < 500 ms during the A rounds."""
    streams, each, pairs = size.pick((15, 8 * MIB, 9), (63, 64 * MIB, 3))
    bulk = DuplexDigestService()
    await bulk.start()
    slow = RawService(push=1 << 40, stall=None)
    await slow.start()
    setup = await start_tunnels(tmp_path, [bulk.target, slow.target])
    bulk_port, slow_port = setup.ports
    await echo_check_bulk(bulk_port)
    await setup.record_baseline()

    solo: list[float] = []
    with_a: list[float] = []
    queued: list[int] = []
    rtts: list[float] = []

    async def round_with_a(base_id: int) -> None:
        a = SlowStream(setup, slow, slow_port)
        await a.open()
        try:
            with_a.append(await _bulk_round(bulk, bulk_port, streams, each, base_id))
            queued.append(a.queued_in_processes())
        finally:
            await a.close()

    # RTT is sampled through all rounds alike, so the polling costs both kinds the same.
    sampler = asyncio.create_task(_sample_rtt(setup, rtts))
    try:
        async with asyncio.timeout(size.pick(100, 1500)):
            for pair in range(pairs):  # adjacent rounds, the order alternating
                solo_id, a_id = 1000 * (2 * pair + 1), 1000 * (2 * pair + 2)
                if pair % 2 == 0:
                    solo.append(await _bulk_round(bulk, bulk_port, streams, each, solo_id))
                    await round_with_a(a_id)
                else:
                    await round_with_a(a_id)
                    solo.append(await _bulk_round(bulk, bulk_port, streams, each, solo_id))
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    ratio = statistics.median(w / s for w, s in zip(with_a, solo, strict=True))
    print(f"F-1 {variant.id}: solo {[round(t, 2) for t in solo]} s, with A "
          f"{[round(t, 2) for t in with_a]} s, median pair ratio {ratio:.2f}; A queued in "
          f"processes {[q // 1024 for q in queued]} KiB; rtt p99 {_p99(rtts) * 1000:.1f} ms "
          f"over {len(rtts)} samples")
    assert ratio <= SLOWDOWN, f"others took {ratio:.2f}x their solo time with A stalled"
    assert max(queued) <= 2 * W, f"A holds {max(queued)} bytes in the processes"
    assert rtts, "no link RTT reported by the dashboard"
    assert _p99(rtts) < RTT_P99, f"link RTT p99 {_p99(rtts):.3f} s"
    await setup.assert_clean()


async def echo_check_bulk(port: int) -> None:
    """One small download first, so the timed rounds do not pay for first-use costs."""
    _, got_len, _ = await DuplexDigestService.visit(port, 1, 0, MIB)
    assert got_len == MIB


async def _sample_rtt(setup: Setup, into: list[float]) -> None:
    last: float | None = None
    for _ in range(100_000):
        rtt = (await setup.dashboard.client())["rtt_ms"]
        if rtt is not None and rtt != last:
            into.append(rtt / 1000.0)
            last = rtt
        await asyncio.sleep(0.25)  # polling: the API has no change notification


# ----------------------------------------------------------------------------- F-2, F-3


async def test_F2_local_service_stops_reading(tmp_path: Path, variant: Variant,
                                              size: Size) -> None:
    """The local service accepts and never reads; the visitor pushes 1 GiB (fast: 64 MiB).
    Pass: the visitor's sender blocks after <= W + kernel buffers accepted: what it got
    accepted minus the kernel queues of the stream's four sockets (/proc/net/tcp), i.e. what
    relay and client hold, is <= W + one socket read at each end. The catalogue estimates
    W + kernel buffers at <= 16 MiB; that figure is printed, not asserted, because the
    kernel alone was measured holding up to 20 MiB: a tunnel socket that read fast before
    its stream paused gets its receive buffer autotuned towards tcp_rmem max (32 MiB here).
    Relay and client RSS grow <= 16 MiB; an echo on another stream works meanwhile. Then
    the visitor leaves with an RST: the stream is freed (clean) although the relay had
    paused reading that socket (regression: the reset went unnoticed until the local
    service ended the stream)."""
    total = size.pick(64 * MIB, 1024 * MIB)
    stall = RawService(bufsize=TEST_SOCKET_BUFFER)
    await stall.start()
    echo = EchoService()
    await echo.start()
    setup = await start_tunnels(tmp_path, [stall.target, echo.target])
    stall_port, echo_port = setup.ports
    await echo_check(echo_port, MIB)
    await setup.record_baseline()
    rss = PeakRss(setup.pids)

    sock = await raw_connect(stall_port, bufsize=TEST_SOCKET_BUFFER)
    try:
        async with rss.running():
            push = await asyncio.wait_for(push_until_blocked(sock, total, STALL), 120)
            await echo_check(echo_port, MIB, seed=5, timeout=30)
        await stall.wait_for("the stalled stream reaches the service", lambda: stall.conns)
        kernel = tcp_queues([(_local_port(sock), stall_port), (stall.port, stall.peers[0])])
    finally:
        abort(sock)  # the relay has paused reading this socket: it must still notice
    held = push.accepted - kernel
    growth = {pid: rss.growth_mib(pid) for pid in setup.pids}
    print(f"F-2 {variant.id}: accepted {push.accepted / MIB:.2f} MiB, kernel "
          f"{kernel / MIB:.2f} MiB, processes {held / 1024:.0f} KiB, RSS growth {growth} MiB; "
          f"within the catalogue's 16 MiB estimate: {push.accepted <= CATALOGUE_ESTIMATE}")
    assert push.blocked, "the visitor's sender never blocked"
    assert held <= W + READ_SLACK, f"relay and client hold {held} bytes of the stream"
    assert all(g <= RSS_GROWTH / MIB for g in growth.values()), growth
    await setup.assert_clean()


async def test_F3_visitor_stops_reading(tmp_path: Path, variant: Variant, size: Size) -> None:
    """Mirror of F-2: the local service streams 1 GiB (fast: 64 MiB) to a visitor that
    reads nothing. Pass: the service's send blocks after <= W + kernel buffers accepted
    (measured as in F-2; the same note on the catalogue's 16 MiB estimate applies); RSS
    growth <= 16 MiB; an echo on another stream works."""
    total = size.pick(64 * MIB, 1024 * MIB)
    source = RawService(push=total, stall=STALL, bufsize=TEST_SOCKET_BUFFER)
    await source.start()
    echo = EchoService()
    await echo.start()
    setup = await start_tunnels(tmp_path, [source.target, echo.target])
    source_port, echo_port = setup.ports
    await echo_check(echo_port, MIB)
    await setup.record_baseline()
    rss = PeakRss(setup.pids)

    sock = await raw_connect(source_port, bufsize=TEST_SOCKET_BUFFER)
    try:
        async with rss.running():
            await source.wait_for("the service's send blocks",
                                  lambda: bool(source.pushes) and source.pushes[0].blocked,
                                  timeout=120)
            await echo_check(echo_port, MIB, seed=5, timeout=30)
        push = source.pushes[0]
        kernel = tcp_queues([(_local_port(sock), source_port), (source.port, source.peers[0])])
    finally:
        abort(sock)
    held = push.accepted - kernel
    growth = {pid: rss.growth_mib(pid) for pid in setup.pids}
    print(f"F-3 {variant.id}: accepted {push.accepted / MIB:.2f} MiB, kernel "
          f"{kernel / MIB:.2f} MiB, processes {held / 1024:.0f} KiB, RSS growth {growth} MiB; "
          f"within the catalogue's 16 MiB estimate: {push.accepted <= CATALOGUE_ESTIMATE}")
    assert push.blocked, "the service's sender never blocked"
    assert held <= W + READ_SLACK, f"relay and client hold {held} bytes of the stream"
    assert all(g <= RSS_GROWTH / MIB for g in growth.values()), growth
    await setup.assert_clean()


# ----------------------------------------------------------------------------- F-5


REFUSED_TRIES = 3
SOURCES = 8  # visitors spread over 127.0.0.2-9, so the per-source cap (256) is not what bites


@pytest.mark.timeout(600)
async def test_F5_stream_limit_refuses_and_bounds_memory(tmp_path: Path, variant: Variant,
                                                         size: Size) -> None:
    """N streams (fast: max_streams 32; full: 256, the default) are open and stalled at both
    ends, the visitor and the service each pushing until blocked. Pass: further visitors
    are reset at once (RST, not queued); relay and client RSS stay <= baseline + 2*N*W +
    32 MiB; the refusals show on the dashboard (JSON and /metrics); after the N streams
    close, the freed slots serve again and the programs are clean (our addition; the
    catalogue asks no "clean" here).

    Clean within 30 s at full size, not the usual 5: 256 streams stalled at both ends fill
    enough socket buffers to put the kernel under TCP memory pressure (nstat:
    TCPMemoryPressures, TCPRcvQDrop), so a visitor's RST can carry a sequence number
    past what the relay's socket accepted. The kernel then answers with a challenge ACK
    (RFC 5961), rate-limited to one per 500 ms per socket (TCPACKSkippedSeq), and the
    reset lands only with the relay's next zero-window probe, whose backoff doubles while
    the stream is stalled: 6.6-6.7 s in 2 of 40 runs (uvloop-tls), 0.1-0.5 s otherwise.
    Nothing the relay can read before then shows the reset (the socket is still
    ESTABLISHED, no pending error).

    (Formerly test_link_faults.py's ``test_streams_beyond_max_streams_are_refused_...``.)"""
    n = size.pick(32, 256)
    push_each = 32 * MIB
    stall = RawService(push=push_each, stall=STALL, bufsize=128 * 1024)
    await stall.start()
    echo = EchoService()
    await echo.start()
    setup = await start_tunnels(tmp_path, [stall.target, echo.target], max_streams=n)
    stall_port, echo_port = setup.ports
    await echo_check(echo_port, MIB)
    await setup.record_baseline()
    rss = PeakRss(setup.pids)

    socks: list[socket.socket] = []
    try:
        async with rss.running():
            for batch in range(0, n, 32):  # the client dials at most 64 targets at once
                for i in range(batch, min(n, batch + 32)):
                    sock = await raw_connect(stall_port, f"127.0.0.{2 + i % SOURCES}")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 * 1024)
                    socks.append(sock)
                await stall.wait_for(f"the batch reaches the service ({len(stall.conns)} "
                                     f"of {len(socks)} did)",
                                     lambda: len(stall.conns) >= len(socks))
            pushes = await asyncio.wait_for(asyncio.gather(*(
                push_until_blocked(s, push_each, STALL) for s in socks)), 300)
            await stall.wait_for("every service sender blocks",
                                 lambda: all(p.blocked or p.accepted >= push_each
                                             for p in stall.pushes), timeout=300)
            outcomes = [await assert_closed_quickly(stall_port) for _ in range(REFUSED_TRIES)]
        assert all(p.blocked for p in pushes), "a visitor's sender never blocked"
        assert outcomes == ["reset"] * REFUSED_TRIES
        client = await setup.dashboard.client()
        assert client["streams_refused"] == REFUSED_TRIES
        metrics = await setup.dashboard.metrics()
        assert f'tunnel_client_streams_refused_total{{client="alpha"}} {REFUSED_TRIES}.0' \
            in metrics.splitlines()
        assert await setup.dashboard.open_streams() == n
    finally:
        for sock in socks:
            abort(sock)
    bound = 2 * n * W + 32 * MIB
    growth = {pid: rss.growth_mib(pid) for pid in setup.pids}
    print(f"F-5 {variant.id}: N={n}, RSS growth {growth} MiB (bound {bound / MIB:.0f} MiB)")
    assert all(g * MIB <= bound for g in growth.values()), growth
    cleaned = time.monotonic()
    await setup.assert_clean(within=F5_CLEAN_WITHIN)
    print(f"F-5 {variant.id}: clean {time.monotonic() - cleaned:.1f} s after the visitors reset")
    await echo_check(echo_port, MIB)  # freed slots serve again
