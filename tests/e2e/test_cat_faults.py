"""Reliability catalogue (docs/reliability.md §2), section (c) faults, by id.

Plus F-4 (fairness on a saturated control link), which needs the same fault proxy. Every
test runs the real programs on 127.0.0.1 (or in network namespaces it creates) and takes
``variant``: stock asyncio / uvloop x TLS on / off. Harness timings: H = 1 s, T = 3 s
(server_config's defaults) unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import secrets
import signal
import socket
import struct
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from tests.dashboard.client import basic, request
from tests.e2e.conftest import Size
from tests.e2e.faultproxy import UP, FaultProxy
from tests.e2e.harness import (
    ALPHA_TOKEN,
    BETA_TOKEN,
    CLIENT_MODULE,
    PINS,
    Proc,
    Variant,
    client_source,
    free_ports,
    server_config,
    start_client,
    start_proc,
    start_server,
    start_tunnel,
    url_port,
    wait_tunnel,
)
from tests.e2e.procstats import fd_count, report, rss_kib
from tests.e2e.rawpeer import first_control as _first_control
from tests.e2e.rawpeer import login as raw_login
from tests.e2e.services import (
    CHUNK,
    EchoService,
    TcpService,
    assert_closed_quickly,
    close_writer,
    echo_check,
    open_visitor,
    pattern_chunks,
    pattern_digest,
    read_exactly_digest,
    send_pattern,
)
from tunnel.client.connector import RESTART_RECONNECT_BOUND
from tunnel.client.dialer import DIAL_ERROR_LOG_INTERVAL, DIAL_TIMEOUT

MIB = 1024 * 1024
H, T = 1.0, 3.0  # server_config's heartbeat interval and timeout
_LINGER_RESET = struct.pack("ii", 1, 0)
DASHBOARD_RE = r"^tunnel-server: dashboard on http://127\.0\.0\.1:(?P<port>\d+)"
DASHBOARD_PASSWORD = "faults-" + secrets.token_urlsafe(15)
LOG_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
#: What R-2 and R-8 allow on top of connector.RESTART_RECONNECT_BOUND (which bounds the
#: start of each client's successful attempt after the relay answers again): the login and
#: port claims themselves, and this test reading up to 200 clients' output on shared cores.
RESTART_BOUND_MARGIN = 3.0


# ---------------------------------------------------------------- helpers


def via(url: str, proxy: FaultProxy) -> str:
    """The relay's link URL with the port of ``proxy`` in front of it (same TLS pin)."""
    proxied = url.replace(f":{url_port(url)}/", f":{proxy.port}/")
    if url in PINS:
        PINS[proxied] = PINS[url]
    return proxied


def with_dashboard(config: dict[str, Any]) -> dict[str, Any]:
    config["dashboard"] = {"listen": "127.0.0.1:0", "username": "admin",
                           "password": DASHBOARD_PASSWORD}
    return config


async def api(server: Proc, path: str) -> Any:
    """GET ``path`` from the dashboard of ``server`` (started with :func:`with_dashboard`)."""
    port = int((await server.wait_for_line(DASHBOARD_RE))["port"])
    reply = await request(port, "GET", path, auth=basic("admin", DASHBOARD_PASSWORD))
    assert reply.status == 200, (path, reply)
    return reply.json()


async def visitor_outcome(reader: asyncio.StreamReader, within: float) -> str:
    """Read until the visitor's stream ends: ``reset``, ``eof`` or ``open`` (timed out)."""
    try:
        async with asyncio.timeout(within):
            for _ in range(1 << 20):
                if not await reader.read(CHUNK):
                    return "eof"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except TimeoutError:
        return "open"
    return "open"


def log_time(line: str) -> float:
    """The wall-clock time of a program's log line (its asctime, local time)."""
    match = LOG_TIME_RE.match(line)
    assert match is not None, line
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def busiest_window(times: list[float], width: float = 1.0) -> int:
    """The most of ``times`` that fall in any window ``[t, t + width)``."""
    ordered = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ordered):
        while ordered[lo] <= t - width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


class StreamingService(TcpService):
    """Sends an endless pattern to every visitor (a download), until the visitor leaves."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            for seed in range(1 << 20):
                await send_pattern(writer, seed, 4 * MIB)


class CountingService(TcpService):
    """Counts every byte it receives (a service that must see none)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(1 << 20):
            data = await reader.read(CHUNK)
            if not data:
                return
            self.bytes += len(data)


async def _raw_login(url: str, token: str) -> ClientConnection:
    """Open a raw link (TLS unverified: the test knows its relay) and log in by hand."""
    ws, _ = await raw_login(url, token)
    return ws


# ----------------------------------------------------------------


async def test_R1_kill9_client_mid_transfer_resets_visitors_and_keeps_the_port(
        tmp_path: Path, variant: Variant) -> None:
    """Public streams get a reset within 1 s; the port stays bound and refuses at once; the
    restarted client serves it again within 3 s, with no "already in use"."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    _, url = await start_server(tmp_path, server_config(tmp_path, [port]))
    spec = [f"{echo.target}:fixed-{port}"]
    client = await start_client(url, ALPHA_TOKEN, spec)
    assert await wait_tunnel(client, echo.target) == port

    reader, writer = await open_visitor(port)
    try:
        await send_pattern(writer, 13, MIB)  # a transfer is running through the tunnel
        await reader.readexactly(1024)
        await client.kill9()
        killed = time.monotonic()
        assert await visitor_outcome(reader, 1.0) == "reset"
        assert time.monotonic() - killed < 1.0
    finally:
        await close_writer(writer)
    assert await assert_closed_quickly(port) == "reset"  # bound, never a clean EOF
    assert echo.connections == 1  # the visitor during the outage never reached the service
    restarted = await start_client(url, ALPHA_TOKEN, spec)
    assert await wait_tunnel(restarted, echo.target, timeout=3 + 2) == port
    await echo_check(port, MIB)
    assert echo.connections == 2
    assert "already in use" not in restarted.stderr


# ----------------------------------------------------------------


async def _paced_upload(writer: asyncio.StreamWriter, seed: int, size: int,
                        pause: float) -> str:
    """Send stream ``seed`` in 256 KiB pieces with ``pause`` between them; return its digest."""
    digest = hashlib.sha256()
    for piece in pattern_chunks(seed, size):
        digest.update(piece)
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(pause)
    return digest.hexdigest()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
@pytest.mark.timeout(90)
async def test_R2_server_restart(tmp_path: Path, variant: Variant, how: str) -> None:
    """SIGTERM: a stream still moving data when the signal comes, that finishes within the
    10 s drain, completes with a correct digest; a stream still open at the deadline is
    reset (never a clean EOF). SIGKILL: the relay is just gone. Either way the restarted
    relay (same link port, same state) gets the client back on every port within
    connector.RESTART_RECONNECT_BOUND + RESTART_BOUND_MARGIN of its return (typically
    0-20 s: a client whose relay went away spreads its reconnect over
    connector.RESTART_SPREAD, see R-8). The SIGKILL variant
    asserts only the reconnect: what the visitors see when the relay dies is R-13's."""
    echo = EchoService()
    await echo.start()
    link_port, port_a, port_b = free_ports(3)
    config = server_config(tmp_path, [port_a, port_b], listen=f"127.0.0.1:{link_port}")
    server, url = await start_server(tmp_path, config)
    client = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port_a}",
                                                   f"{echo.target}:fixed-{port_b}"])
    assert await wait_tunnel(client, echo.target) == port_a
    await wait_tunnel(client, echo.target, since=1)
    mark = client.mark()

    finishing_reader, finishing_writer = await open_visitor(port_a)
    held_reader, held_writer = await open_visitor(port_b)
    try:
        held_writer.write(b"hello")
        assert await asyncio.wait_for(held_reader.readexactly(5), 5) == b"hello"
        size = 4 * MIB
        pieces = [bytes(piece) for piece in pattern_chunks(21, size)]
        upload = asyncio.create_task(_paced_upload(finishing_writer, 21, size, pause=0.1))
        # The transfer is in flight when the signal arrives: its first piece came back.
        first = await asyncio.wait_for(finishing_reader.readexactly(len(pieces[0])), 5)
        assert first == pieces[0]
        rest = size - len(first)
        echoed = asyncio.create_task(read_exactly_digest(finishing_reader, rest))
        signalled = time.monotonic()
        if how == "SIGTERM":
            server.send_signal(signal.SIGTERM)
            sent = await upload
            assert sent == hashlib.sha256(b"".join(pieces)).hexdigest()
            got_len, got = await asyncio.wait_for(echoed, 10)
            # completed within the drain, intact
            assert (got_len, got) == (rest, hashlib.sha256(b"".join(pieces[1:])).hexdigest())
            finishing_writer.write_eof()
            assert await visitor_outcome(finishing_reader, 5) == "eof"
            assert await visitor_outcome(held_reader, 10 + 5) == "reset"
            assert 10 - 0.5 <= time.monotonic() - signalled <= 10 + 3
            assert await server.wait_exit() == 0
        else:
            await server.kill9()
            for task in (upload, echoed):
                task.cancel()
            await asyncio.gather(upload, echoed, return_exceptions=True)
    finally:
        await close_writer(finishing_writer)
        await close_writer(held_writer)

    server, url = await start_server(tmp_path, config)  # same link port, same state
    back = time.monotonic()
    bound = RESTART_RECONNECT_BOUND + RESTART_BOUND_MARGIN
    await wait_tunnel(client, echo.target, since=mark, timeout=bound)
    await wait_tunnel(client, echo.target, since=mark + 1, timeout=bound)
    took = time.monotonic() - back
    assert took <= bound
    await asyncio.gather(echo_check(port_a, MIB, seed=1), echo_check(port_b, MIB, seed=2))
    print(f"R-2 {how}: client back on both ports {took:.2f} s after the relay returned")


# ----------------------------------------------------------------


async def test_R3_blackholed_link_detected_by_both_ends_three_cycles(
        tmp_path: Path, variant: Variant) -> None:
    """The proxy freezes the link (sockets open, nothing forwarded), three times. Each
    time both ends declare it dead within H + T + 1 s, the client logs in again through the
    proxy (a new connection is forwarded), and the port serves within 2 s of that login.
    At the end the dashboard shows exactly one online session."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    server, url = await start_server(tmp_path, with_dashboard(server_config(tmp_path, [port])))
    proxy = FaultProxy(url_port(url))
    await proxy.start()
    try:
        client = await start_client(via(url, proxy), ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
        assert await wait_tunnel(client, echo.target) == port
        for _ in range(3):
            mark_out = client.mark()
            err_client, err_server = len(client.stderr_lines), len(server.stderr_lines)
            proxy.blackhole()
            started = time.monotonic()
            await client.wait_for_line(r"silent for", timeout=H + T + 1, since=err_client,
                                       stream="stderr")
            await server.wait_for_line(r"link of alpha silent for", timeout=H + T + 1,
                                       since=err_server, stream="stderr")
            assert time.monotonic() - started <= H + T + 1
            await client.wait_for_line(r"logged in to", timeout=10, since=err_client,
                                       stream="stderr")
            logged_in = time.monotonic()
            assert await wait_tunnel(client, echo.target, since=mark_out, timeout=2) == port
            await echo_check(port, 64 * 1024)
            assert time.monotonic() - logged_in <= 2.0
        await echo_check(port, MIB)
        status = await api(server, "/api/status")
        assert status["clients"]["online"] == 1
        clients = await api(server, "/api/clients")
        assert [c["name"] for c in clients if c["online"]] == ["alpha"]
    finally:
        await proxy.close()


async def test_R3_stale_link_replaced_at_once(tmp_path: Path, variant: Variant) -> None:
    """A half-open link the relay has not noticed yet (a 60 s heartbeat timeout) is replaced
    by a fresh login at once, and the port serves within 2 s of that login."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    config = server_config(tmp_path, [port], heartbeat_interval=10, heartbeat_timeout=60)
    server, url = await start_server(tmp_path, with_dashboard(config))
    proxy = FaultProxy(url_port(url))
    await proxy.start()
    try:
        first = await start_client(via(url, proxy), ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
        assert await wait_tunnel(first, echo.target, mode="fixed") == port
        await echo_check(port, MIB)
        proxy.blackhole()
        await first.kill9()
        second = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
        await second.wait_for_line(r"logged in to", stream="stderr")
        logged_in = time.monotonic()
        assert await wait_tunnel(second, echo.target, mode="fixed", timeout=2) == port
        await echo_check(port, MIB)
        assert time.monotonic() - logged_in <= 2.0 + 1.0  # + the 1 MiB echo itself
        await server.wait_for_line(r"client alpha: new login from .* replaces", timeout=1,
                                   stream="stderr")
        assert (await api(server, "/api/status"))["clients"]["online"] == 1
    finally:
        await proxy.close()


def _netns_available() -> bool:
    if os.geteuid() != 0:
        return False
    name = f"tnprobe{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, check=False)
    if probe.returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return True


@pytest.mark.root
@pytest.mark.skipif(not _netns_available(), reason="needs root and `ip netns add`")
async def test_R3_veth_link_down_in_netns(tmp_path: Path, variant: Variant) -> None:
    """The real thing: the relay runs in its own network namespace behind a veth pair and
    the link goes down (`ip link set down`) with the TCP connection established. Both ends
    declare the session dead within H + T + 1 s; when the link is back up the client logs
    in again and the port serves within 2 s of that login."""
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    ns, outside, inside = f"tn{tag}", f"tnA{tag}", f"tnB{tag}"
    octet = random.randrange(1, 250)
    here, there = f"10.213.{octet}.1", f"10.213.{octet}.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", ns)
    try:
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", ns)
        ip("addr", "add", f"{here}/30", "dev", outside)
        ip("link", "set", outside, "up")
        ip("-n", ns, "addr", "add", f"{there}/30", "dev", inside)
        ip("-n", ns, "link", "set", inside, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        echo = EchoService()
        await echo.start()
        port = random.randrange(20000, 30000)  # a fresh namespace: every port is free there
        config = server_config(tmp_path, [port], listen=f"{there}:0", public_host=there)
        server, url = await start_server(tmp_path, config, wrap=["ip", "netns", "exec", ns])
        # Plain ws:// to a non-loopback address needs the explicit opt-in.
        extra = [] if variant.tls else ["--insecure"]
        client = await _start_client_with(url, [f"{echo.target}:fixed-{port}"], extra)
        assert await wait_tunnel(client, echo.target, server_host=there) == port
        err_client, err_server = len(client.stderr_lines), len(server.stderr_lines)
        mark_out = client.mark()
        ip("link", "set", outside, "down")
        started = time.monotonic()
        await client.wait_for_line(r"silent for", timeout=H + T + 1, since=err_client,
                                   stream="stderr")
        await server.wait_for_line(r"link of alpha silent for", timeout=H + T + 1,
                                   since=err_server, stream="stderr")
        assert time.monotonic() - started <= H + T + 1
        ip("link", "set", outside, "up")
        await client.wait_for_line(r"logged in to", timeout=20, since=err_client,
                                   stream="stderr")
        logged_in = time.monotonic()
        assert await wait_tunnel(client, echo.target, since=mark_out, timeout=2,
                                 server_host=there) == port
        assert time.monotonic() - logged_in <= 2.0
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", outside], capture_output=True, check=False)


async def _start_client_with(url: str, exposes: list[str], extra: list[str]) -> Proc:
    args = ["--server", url, "--token", ALPHA_TOKEN, *extra]
    if url in PINS:
        args += ["--fingerprint", PINS[url]]
    for spec in exposes:
        args += ["--expose", spec]
    return await start_proc("tunnel-client", CLIENT_MODULE, args)


# ----------------------------------------------------------------


async def test_R4_client_frozen_is_dropped_and_comes_back(tmp_path: Path,
                                                          variant: Variant) -> None:
    """SIGSTOP the client for 3 x the heartbeat timeout: the relay drops its session within
    H + T + 1 s; after SIGCONT the client logs in again by itself (never two sessions)."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    config = server_config(tmp_path, [port], heartbeat_interval=1, heartbeat_timeout=2)
    server, url = await start_server(tmp_path, config)
    client = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
    assert await wait_tunnel(client, echo.target) == port
    mark_err, mark_out = len(server.stderr_lines), client.mark()

    client.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        await server.wait_for_line(r"client alpha offline", timeout=1 + 2 + 1 + 1,
                                   since=mark_err, stream="stderr")
        assert time.monotonic() - stopped <= 1 + 2 + 1 + 0.5
        await asyncio.sleep(max(0.0, 6 - (time.monotonic() - stopped)))  # frozen for 3 x T
    finally:
        client.send_signal(signal.SIGCONT)
    resumed = time.monotonic()
    assert await wait_tunnel(client, echo.target, since=mark_out, timeout=10) == port
    assert time.monotonic() - resumed <= 2 + 1  # notices and logs in again within ~2 s
    await echo_check(port, MIB)
    logins = [line for line in server.stderr_lines[mark_err:] if "client alpha online" in line]
    assert len(logins) == 1


# ----------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_R5_long_idle_stream_through_an_idle_killing_middlebox(
        tmp_path: Path, variant: Variant, size: Size) -> None:
    """The link goes through a proxy that resets connections idle for 5 s. An SSH-like
    stream sits idle for 10 x H (fast; the catalogue's 120 x H at full size), then moves
    1 MiB intact: the heartbeat kept the link busy enough for the middlebox (no kill) and
    there was no false heartbeat timeout. Then the middlebox kills the link anyway (an
    RST): the client is back, serving, within 2 s."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    server, url = await start_server(tmp_path, server_config(tmp_path, [port]))
    proxy = FaultProxy(url_port(url))
    await proxy.start()
    proxy.idle_kill(5.0)
    try:
        client = await start_client(via(url, proxy), ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
        assert await wait_tunnel(client, echo.target) == port
        reader, writer = await open_visitor(port)
        try:
            writer.write(b"SSH-2.0-banner\r\n")
            assert await asyncio.wait_for(reader.readexactly(16), 5) == b"SSH-2.0-banner\r\n"
            await asyncio.sleep(size.pick(10, 120) * H)  # the idle period is the test
            sent, (got_len, got) = await asyncio.gather(
                send_pattern(writer, 5, MIB), read_exactly_digest(reader, MIB))
            assert (got_len, got) == (MIB, sent)
        finally:
            await close_writer(writer)
        assert proxy.idle_kills == 0
        for proc in (client, server):
            assert not [ln for ln in proc.stderr_lines if "silent for" in ln]
        assert proxy.connections == 1

        mark = client.mark()
        proxy.reset_peer()  # the middlebox drops the link anyway
        killed = time.monotonic()
        assert await wait_tunnel(client, echo.target, since=mark, timeout=2) == port
        await echo_check(port, 64 * 1024)
        assert time.monotonic() - killed <= 2.0
    finally:
        await proxy.close()


# ----------------------------------------------------------------


@pytest.mark.timeout(600)
async def test_R6_fixed_port_reclaimed_and_exclusive(tmp_path: Path, variant: Variant,
                                                     size: Size) -> None:
    """First B claims A's port while A is online: refused, and A keeps serving. Then cycles
    (fast 10, full 100): owner A is killed at a random moment (sometimes with a
    transfer running); while A is offline, B with valid credentials claims A's port and is
    refused (exit 3, "leased to another client") and a public client that connects
    meanwhile never reaches B (B's service sees 0 bytes, the visitor is reset at once); A
    gets the port back every time and the lease never changes owner."""
    service_a, service_b = EchoService(), CountingService()
    await service_a.start()
    await service_b.start()
    (port,) = free_ports(1)
    server, url = await start_server(tmp_path, with_dashboard(server_config(tmp_path, [port])))
    owner = await start_client(url, ALPHA_TOKEN, [f"{service_a.target}:fixed-{port}"])
    assert await wait_tunnel(owner, service_a.target, mode="fixed") == port
    intruder = await start_client(url, BETA_TOKEN, [f"{service_b.target}:fixed-{port}"])
    assert await intruder.wait_exit() == 3  # refused while the owner is online, too
    assert f"port {port} is leased to another client" in intruder.stderr
    await echo_check(port, 64 * 1024)  # and the owner still serves it
    assert service_a.connections == 1
    await owner.kill9()
    rng = random.Random(6)
    for _ in range(size.pick(10, 100)):
        owner = await start_client(url, ALPHA_TOKEN, [f"{service_a.target}:fixed-{port}"])
        assert await wait_tunnel(owner, service_a.target, mode="fixed") == port
        traffic = asyncio.create_task(echo_check(port, 4 * MIB)) if rng.random() < 0.5 else None
        await asyncio.sleep(rng.uniform(0, 0.3))
        await owner.kill9()
        if traffic is not None:
            with contextlib.suppress(Exception):
                await traffic
        intruder = await start_client(url, BETA_TOKEN, [f"{service_b.target}:fixed-{port}"])
        probes: list[str] = []
        for _ in range(100):  # public visitors while B tries: bounded, ends when B exits
            probes.append(await assert_closed_quickly(port))
            if intruder.returncode is not None:
                break
        assert await intruder.wait_exit() == 3
        assert f"port {port} is leased to another client" in intruder.stderr
        assert set(probes) <= {"reset", "eof", "refused"}
        assert service_b.connections == 0 and service_b.bytes == 0
    owner = await start_client(url, ALPHA_TOKEN, [f"{service_a.target}:fixed-{port}"])
    assert await wait_tunnel(owner, service_a.target, mode="fixed") == port
    await echo_check(port, MIB)
    leases = await api(server, "/api/leases")
    assert [(lease["port"], lease["client"]) for lease in leases] == [(port, "alpha")]
    assert not [ln for ln in server.stderr_lines if re.search(r"client beta: tunnel", ln)]


# ----------------------------------------------------------------


async def test_R7_closed_target_resets_fast_logs_once_and_recovers(
        tmp_path: Path, variant: Variant) -> None:
    """The local target port is closed: every visitor gets an RST within 1 s, the failure
    is logged once per 10 s per target (not per visitor), and the first connection after
    the service comes back on that port succeeds."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    target_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: connects get ECONNREFUSED
    target = f"127.0.0.1:{target_port}"
    (port,) = free_ports(1)
    _, url = await start_server(tmp_path, server_config(tmp_path, [port]))
    client = await start_client(url, ALPHA_TOKEN, [f"{target}:fixed-{port}"])
    assert await wait_tunnel(client, target) == port
    started = time.monotonic()
    for _ in range(5):
        opened = time.monotonic()
        try:
            reader, writer = await open_visitor(port)
        except ConnectionResetError:  # reset before connect() even returned: also an RST
            outcome = "reset"
        else:
            try:
                writer.write(b"hello")
                outcome = await visitor_outcome(reader, 1.0)
            finally:
                await close_writer(writer)
        assert outcome == "reset"
        assert time.monotonic() - opened <= 1.0
    assert time.monotonic() - started < DIAL_ERROR_LOG_INTERVAL
    unreachable = [line for line in client.stderr_lines if "unreachable" in line]
    assert len(unreachable) == 1, unreachable

    assert client.returncode is None  # an unreachable target never ends the client
    service = EchoService()
    await service.start(port=target_port)  # the service comes back
    await echo_check(port, MIB)
    assert service.connections == 1 and client.returncode is None


async def test_R7_blackholed_target_times_out_then_resets_and_logs_once(
        tmp_path: Path, variant: Variant) -> None:
    """A local target that swallows SYNs (a listener whose queue is full and never
    accepts): the visitor gets a reset when the 10 s dial timeout ends, not a hang, and the
    client logs the failure once per 10 s per target, not per visitor."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    target_port = blackhole.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue; later SYNs are dropped by the kernel
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", target_port))
            fillers.append(filler)
        (port,) = free_ports(1)
        _, url = await start_server(tmp_path, server_config(tmp_path, [port]))
        client = await start_client(url, ALPHA_TOKEN, [f"127.0.0.1:{target_port}:fixed-{port}"])
        assert await wait_tunnel(client, f"127.0.0.1:{target_port}") == port

        visitors = [await open_visitor(port) for _ in range(3)]
        started = time.monotonic()
        outcomes = [await visitor_outcome(reader, DIAL_TIMEOUT + 3) for reader, _ in visitors]
        for _, writer in visitors:
            await close_writer(writer)
        elapsed = time.monotonic() - started
        assert outcomes == ["reset"] * 3
        assert DIAL_TIMEOUT - 1 <= elapsed <= DIAL_TIMEOUT + 3
        unreachable = [line for line in client.stderr_lines if "unreachable" in line]
        assert len(unreachable) == 1, unreachable
    finally:
        for filler in fillers:
            filler.close()
        blackhole.close()


# ----------------------------------------------------------------


def _attempt_times(client: Proc, since: int) -> list[float]:
    """Wall-clock times of the client's link attempts from its log: each failed attempt
    logs a warning, each successful one "logged in to"."""
    pattern = re.compile(r"cannot reach the relay|link to \S+ lost or not established|"
                         r"logged in to|relay \S+ refused the connection")
    return [log_time(ln) for ln in client.stderr_lines[since:] if pattern.search(ln)]


@pytest.mark.plain_only
@pytest.mark.timeout(300)
async def test_R8_reconnect_storm_is_spread_by_jitter(tmp_path: Path, variant: Variant,
                                                      size: Size) -> None:
    """Clients (fast 40, full 200), each its own identity with one port; the relay is
    killed and restarted on the same link port. Every client is back within
    connector.RESTART_RECONNECT_BOUND (30 s) of the relay listening again, plus
    RESTART_BOUND_MARGIN for the logins themselves, and no 1 s window holds more than 25 %
    of the reconnect attempts.

    Attempts are counted where they cost something: at the relay (every link that reaches
    it after the restart logs a login, a refusal or an abandoned login). Attempts made while
    no relay listens are refused by the kernel; they are in the clients' logs and reported,
    but they all come in the first second after the kill by design (a link lost to a
    middlebox must come back within 2 s, R-5), so they cannot be what is spread.

    The relay is started again once every client's first retry found it down. A relay
    back sooner than that retry (0.25-0.5 s after the loss) gets that first wave within
    0.25 s: a client cannot tell a relay crash from a middlebox that killed its link or a
    laptop that slept (R-4, R-5), and those must be back within 2 s, so the first retry
    stays quick; only a refused retry (or the relay's shutdown GOAWAY) shows that the relay
    itself went away, and from there the next attempt is spread over 20 s
    (connector.RESTART_SPREAD).

    Why 40 and not 20 at fast size: with 20 clients the criterion is "at most 5 in any
    second", and random jitter of any spread that still meets the bound
    breaks it in about 1 run in 20 by chance alone; 40 brings that below 1 in 300.
    Plain only: the schedule under test is the connector's, decided before any TLS, and 40
    concurrent TLS handshakes on 2 cores would measure the CPU, not the jitter."""
    count = size.pick(40, 200)
    echo = EchoService()
    await echo.start()
    (link_port,) = free_ports(1)
    ports = free_ports(count)
    clients = {f"c{i:03d}": {"token": f"storm-client-token-{i:05d}"} for i in range(count)}
    config = server_config(tmp_path, ports, clients=clients, listen=f"127.0.0.1:{link_port}")
    server, url = await start_server(tmp_path, config)
    procs = [await start_client(url, spec["token"], [echo.target], name=f"client-{name}",
                                extra=client_source(i))
             for i, (name, spec) in enumerate(clients.items())]
    await asyncio.gather(*(wait_tunnel(p, echo.target, timeout=60) for p in procs))
    marks = [(p.mark(), len(p.stderr_lines)) for p in procs]

    await server.kill9()
    killed = time.monotonic()
    # The relay comes back once every client's first, quick retry found it down, as after
    # any restart that takes longer than that retry (0.25-0.5 s; see the docstring).
    await asyncio.gather(*(p.wait_for_line(r"cannot reach the relay", timeout=10, since=err,
                                           stream="stderr")
                           for p, (_, err) in zip(procs, marks, strict=True)))
    server, url = await start_server(tmp_path, config)
    back = time.monotonic()
    bound = RESTART_RECONNECT_BOUND + RESTART_BOUND_MARGIN

    async def back_after(proc: Proc, out: int) -> float:
        await wait_tunnel(proc, echo.target, since=out, timeout=bound)
        return time.monotonic() - back

    backs = await asyncio.gather(*(back_after(p, out)
                                   for p, (out, _) in zip(procs, marks, strict=True)))
    took = time.monotonic() - killed
    arrivals = [log_time(ln) for ln in server.stderr_lines
                if re.search(r"client c\d+ online from|login refused|login from .* abandoned", ln)]
    busiest = busiest_window(arrivals)
    tried = [t for p, (_, err) in zip(procs, marks, strict=True) for t in _attempt_times(p, err)]
    print(f"R-8: {count} clients back {took:.1f} s after the kill, the last {max(backs):.1f} s "
          f"after the relay listened again (bound {RESTART_RECONNECT_BOUND:.0f} s + "
          f"{RESTART_BOUND_MARGIN:.0f} s); relay saw {len(arrivals)} "
          f"attempts, busiest 1 s window {busiest} ({busiest / len(arrivals):.0%}); clients "
          f"made {len(tried)} attempts, busiest window {busiest_window(tried)}")
    assert max(backs) <= bound
    assert len(arrivals) >= count
    assert busiest <= 0.25 * len(arrivals)


async def test_R8_bad_credentials_exit_without_a_hot_loop(tmp_path: Path,
                                                          variant: Variant) -> None:
    """The catalogue asks that a client with bad credentials settle at a 5 min backoff cap.
    Our client does better for its own process: a refused login is final (exit code 3,
    like ssh), because retrying cannot fix a wrong token; a service manager that restarts
    it is rate-limited by the relay's per-source penalties (S-5). Either way: exactly one
    login attempt reaches the relay, and the process exits at once, no hot loop."""
    (port,) = free_ports(1)
    server, url = await start_server(tmp_path, server_config(tmp_path, [port]))
    mark = len(server.stderr_lines)
    client = await start_client(url, "alpha-wrong-token-00001", ["127.0.0.1:9"])
    assert await client.wait_exit(timeout=10) == 3
    assert "authentication failed" in client.stderr
    await asyncio.sleep(1.0)  # any retry would show up here as a second refusal
    refusals = [ln for ln in server.stderr_lines[mark:] if "login refused" in ln]
    assert len(refusals) == 1, refusals


# ----------------------------------------------------------------


@pytest.mark.timeout(300)
async def test_R9_session_churn_leaves_nothing_behind(tmp_path: Path, variant: Variant,
                                                      size: Size) -> None:
    """Connect, authenticate and disconnect many times, a tenth of them half-open (no close
    frame): fast 200 cycles, full the catalogue's 1000 with 100 half-open. The relay's
    file descriptors return to their baseline, memory stays flat and the dashboard shows
    0 online sessions at the end. After each half-open cycle the test waits (bounded, 10 s)
    until the dashboard shows the session gone, which is itself checked: a login that beat
    the relay to the dead socket would replace a session, and S-7's guard rightly answers
    the 5th replacement in a minute with 1013 (seen at full size on uvloop)."""
    (port,) = free_ports(1)
    server, url = await start_server(tmp_path, with_dashboard(server_config(tmp_path, [port])))

    async def until_offline(what: str) -> None:
        for _ in range(500):  # bounded: 10 s; the relay's state is another process's
            if (await api(server, "/api/status"))["clients"]["online"] == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"the relay did not notice {what} within 10 s")

    async def cycle(polite: bool) -> None:
        ws = await _raw_login(url, ALPHA_TOKEN)
        assert _first_control(await ws.recv())["type"] == "welcome"
        if polite:
            await ws.close()
            return
        ws.transport.abort()  # no close frame: the relay must notice the dead socket
        await until_offline("a dead socket")

    await api(server, "/api/status")  # the dashboard's own state is in the baseline
    for i in range(20):  # warm-up, so lazily created state is in the baseline
        await cycle(polite=i % 2 == 0)
    await until_offline("the last warm-up close")  # then measure the baseline
    fds, rss = fd_count(server.pid), rss_kib(server.pid)
    for i in range(size.pick(200, 1000)):
        await cycle(polite=i % 10 != 0)
    for _ in range(100):  # bounded: the last closes are processed asynchronously
        if fd_count(server.pid) <= fds + 2:
            break
        await asyncio.sleep(0.05)
    growth_kib = rss_kib(server.pid) - rss
    report("R-9", cycles=size.pick(200, 1000), fds_over_baseline=fd_count(server.pid) - fds,
           rss_growth_mib=round(growth_kib / 1024, 2))
    assert fd_count(server.pid) <= fds + 2
    assert growth_kib < 8 * 1024  # "leak-free": < 8 MiB growth
    assert server.returncode is None
    await until_offline("the last close")  # the dashboard shows 0 online sessions


# ----------------------------------------------------------------


async def test_R10_emfile_on_accept_is_survived(tmp_path: Path, variant: Variant) -> None:
    """The relay runs under ``prlimit --nofile=256``; 400 public connections are opened
    (from four loopback addresses, so the per-source cap of 256 is not what stops them).
    The relay does not crash, an existing stream keeps working, accepting resumes within
    2 s after the connections are closed, and EMFILE is logged as a one-line warning, not
    a traceback (the autouse fixture fails on any traceback), on both loops: public ports
    accept by themselves (``tunnel.server.acceptor``), so uvloop's libuv, which would shed
    the excess silently, never sees the error."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    config = server_config(tmp_path, [port], max_streams=1000)
    server, url = await start_server(tmp_path, config, wrap=["prlimit", "--nofile=256:256"])
    client = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
    assert await wait_tunnel(client, echo.target) == port
    existing_reader, existing_writer = await open_visitor(port)
    held: list[asyncio.StreamWriter] = []
    try:
        existing_writer.write(b"before")
        assert await asyncio.wait_for(existing_reader.readexactly(6), 5) == b"before"
        mark = len(server.stderr_lines)
        refused = 0
        for i in range(400):  # the kernel completes each handshake (backlog 512)
            source = f"127.0.0.{2 + i % 4}"
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 5)
            except ConnectionResetError:  # turned away (stream or dial limits): fine
                refused += 1
                continue
            held.append(writer)
        print(f"R-10: {len(held)} public connections held, {refused} reset at connect")
        await server.wait_for_line(r"cannot accept new connections: .*out of file "
                                   r"descriptors", timeout=10, since=mark, stream="stderr")
        existing_writer.write(b"during")
        assert await asyncio.wait_for(existing_reader.readexactly(6), 5) == b"during"
    finally:
        for writer in held:
            writer.transport.abort()
    freed = time.monotonic()
    for _ in range(100):  # until served: the relay first works through the dead backlog
        remaining = 2.0 - (time.monotonic() - freed)
        assert remaining > 0, "no visitor served within 2 s after the fds were freed"
        try:
            await echo_check(port, 64 * 1024, timeout=remaining)
            break
        except (AssertionError, OSError, TimeoutError, ExceptionGroup):  # reset: again
            await asyncio.sleep(0.05)
    resumed = time.monotonic() - freed
    assert resumed <= 2.0
    print(f"R-10: served again {resumed:.2f} s after the fds were freed")
    warnings = [ln for ln in server.stderr_lines if "cannot accept new" in ln]
    assert len(warnings) == 1, warnings  # one line per 10 s, not one per accept()
    existing_writer.write(b"after")
    assert await asyncio.wait_for(existing_reader.readexactly(5), 5) == b"after"
    await close_writer(existing_writer)
    assert server.returncode is None


# ----------------------------------------------------------------

#: How long after a kill -9 the far end of a forwarded connection must have seen its reset.
CRASH_RESET_WITHIN = 5.0


class SinkService(TcpService):
    """Reads each connection to its end and records how it ended (``eof`` or ``reset``),
    then sends ``reply`` bytes (pattern seed 5) and closes. ``receiving`` is set at the
    first byte of an upload."""

    def __init__(self, reply: int = 0) -> None:
        super().__init__()
        self.reply = reply
        self.received = 0
        self.receiving = asyncio.Event()
        self.endings: asyncio.Queue[str] = asyncio.Queue()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                self.received += len(data)
                self.receiving.set()
        except ConnectionResetError:
            self.endings.put_nowait("reset")
            return
        self.endings.put_nowait("eof")
        if self.reply:
            await send_pattern(writer, 5, self.reply)


async def _upload_forever(writer: asyncio.StreamWriter) -> None:
    """Send pattern bytes until the connection fails (the test cancels it otherwise)."""
    with contextlib.suppress(OSError):
        for seed in range(1 << 20):
            await send_pattern(writer, seed, 4 * MIB)


@pytest.mark.parametrize("killed", ["relay", "client"])
async def test_R13_kill9_mid_stream_is_a_reset_never_an_eof(
        tmp_path: Path, variant: Variant, killed: str) -> None:
    """kill -9 of the relay while a visitor downloads: the visitor sees a reset. kill -9 of
    the client while the local service receives an upload: the service sees a reset. In
    both the kernel closes the dead program's socket, and only SO_LINGER 0 (set while a
    stream is open) turns that close into RST instead of FIN."""
    service: TcpService = StreamingService() if killed == "relay" else SinkService()
    await service.start()
    server, client, port = await start_tunnel(tmp_path, service.target)
    reader, writer = await open_visitor(port)
    upload: asyncio.Task[None] | None = None
    try:
        if isinstance(service, SinkService):
            upload = asyncio.create_task(_upload_forever(writer))
            await asyncio.wait_for(service.receiving.wait(), 10)
            await client.kill9()
            ending = await asyncio.wait_for(service.endings.get(), CRASH_RESET_WITHIN)
            assert ending == "reset", "the local service took the client's death for an EOF"
        else:
            await asyncio.wait_for(reader.readexactly(MIB), 10)  # the download is flowing
            await server.kill9()
            assert await visitor_outcome(reader, CRASH_RESET_WITHIN) == "reset", \
                "the visitor took the relay's death for an EOF"
    finally:
        if upload is not None:
            upload.cancel()
            await asyncio.gather(upload, return_exceptions=True)
        writer.transport.abort()


async def test_R13_orderly_end_is_still_a_clean_eof_both_ways(
        tmp_path: Path, variant: Variant) -> None:
    """The control case: an upload ended with FIN reaches the service as EOF, and the reply
    the service sends and closes reaches the visitor whole, then EOF; none of it is reset.
    Then both programs are killed: a stream that ended cleanly stays ended cleanly."""
    reply = 2 * MIB
    service = SinkService(reply=reply)
    await service.start()
    server, client, port = await start_tunnel(tmp_path, service.target)
    reader, writer = await open_visitor(port)
    try:
        await send_pattern(writer, 3, MIB)
        writer.write_eof()
        assert await asyncio.wait_for(service.endings.get(), 10) == "eof"
        assert service.received == MIB
        got_len, got = await asyncio.wait_for(read_exactly_digest(reader, reply), 10)
        assert (got_len, got) == (reply, pattern_digest(5, reply))
        assert await visitor_outcome(reader, 5) == "eof"
    finally:
        await close_writer(writer)
    await client.kill9()
    await server.kill9()


# ----------------------------------------------------------------


#: A relay told twice to stop must be gone within this (its drain timeout is 10 s).
STOP_AT_ONCE_WITHIN = 3.0


@pytest.mark.parametrize("signals", [("SIGINT", "SIGINT"), ("SIGTERM", "SIGINT"),
                                     ("SIGTERM", "SIGTERM")])
async def test_R14_second_signal_stops_the_relay_at_once(
        tmp_path: Path, variant: Variant, signals: tuple[str, str]) -> None:
    """With a visitor's connection open, the first signal starts the 10 s drain; the second
    one ends the relay at once, and the open visitor sees a reset, not an EOF."""
    echo = EchoService()
    await echo.start()
    server, _, port = await start_tunnel(tmp_path, echo.target)
    reader, writer = await open_visitor(port)
    try:
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
        first, second = (getattr(signal, name) for name in signals)
        mark = len(server.stderr_lines)
        server.send_signal(first)
        await server.wait_for_line(r"waiting up to \d+ s for 1 open streams", since=mark,
                                   stream="stderr")
        server.send_signal(second)
        assert await server.wait_exit(STOP_AT_ONCE_WITHIN) == 0
        assert await visitor_outcome(reader, 1.0) == "reset"
    finally:
        writer.transport.abort()
    server.assert_no_traceback()


# ---------------------------------------------------------------- F-4


LINK_RATE = 20_000_000 // 8  # 20 Mbit/s in bytes per second
#: F-4: how long every stream may take to receive its first bytes, and how often to look.
RAMP_UP_LIMIT = 20.0
POLL_INTERVAL = 0.05


async def _read_counting(reader: asyncio.StreamReader, counts: list[int], index: int,
                         stop: asyncio.Event) -> None:
    with contextlib.suppress(OSError):
        for _ in range(1 << 24):
            if stop.is_set():
                return
            data = await reader.read(CHUNK)
            if not data:
                return
            counts[index] += len(data)


@pytest.mark.timeout(240)
async def test_F4_fairness_on_a_saturated_control_link(tmp_path: Path, variant: Variant,
                                                       size: Size) -> None:
    """The link goes through the fault proxy throttled to 20 Mbit/s (a token bucket); 32
    downloads saturate it for 16 s (fast) or the catalogue's 60 s (full). No false
    heartbeat timeout; the relay's heartbeat RTT (dashboard ``rtt_ms``, sampled every
    0.25 s) has p99 < 2 s; every stream gets >= 50 % of the fair share.

    Why 16 s and not 8 at fast size: when the link drains, every paused stream reads once
    (up to 256 KiB, the event loop's read size), so one round of 32 streams is up to 8 MiB,
    3.4 s at 20 Mbit/s; a share measured over 2 rounds is mostly rounding, over 5 it is not.

    The WebSocket write buffer (<= write_limit + 1 frame) is not observable from outside
    the process; what is observable is that the relay's watchdog over the link's write
    buffer never fired (no "does not read" line) and that the link stayed up."""
    service = StreamingService()
    await service.start()
    (port,) = free_ports(1)
    server, url = await start_server(tmp_path, with_dashboard(server_config(tmp_path, [port])))
    proxy = FaultProxy(url_port(url))
    await proxy.start()
    proxy.bandwidth(LINK_RATE, direction=UP)  # client -> relay carries the downloads
    stop = asyncio.Event()
    visitors: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        client = await start_client(via(url, proxy), ALPHA_TOKEN,
                                    [f"{service.target}:fixed-{port}"])
        assert await wait_tunnel(client, service.target) == port
        streams = 32
        counts = [0] * streams
        visitors = [await open_visitor(port) for _ in range(streams)]
        readers = [asyncio.create_task(_read_counting(r, counts, i, stop))
                   for i, (r, _) in enumerate(visitors)]
        # Ramp up: the shares are measured from the moment every stream has received its
        # first bytes (the link is saturated by then), and at least 2 s in; all 32 first
        # windows, 32 MiB, take far longer at this rate, so the measurement is not of them.
        ramp = asyncio.get_running_loop().time() + 2.0
        async with asyncio.timeout(RAMP_UP_LIMIT):
            while not all(counts) or asyncio.get_running_loop().time() < ramp:
                await asyncio.sleep(POLL_INTERVAL)
        base = list(counts)
        duration = size.pick(16.0, 60.0)
        rtts: list[float] = []
        started = time.monotonic()
        for _ in range(int(duration / 0.25) + 40):
            if time.monotonic() - started >= duration:
                break
            alpha = next(c for c in await api(server, "/api/clients") if c["name"] == "alpha")
            assert alpha["online"]
            if alpha["rtt_ms"] is not None:
                rtts.append(float(alpha["rtt_ms"]) / 1000)
            await asyncio.sleep(0.25)
        elapsed = time.monotonic() - started
        moved = [now - then for now, then in zip(counts, base, strict=True)]
        stop.set()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        fair = sum(moved) / streams
        rtts.sort()
        p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]
        print(f"F-4: {sum(moved) / elapsed / 1e6:.2f} MB/s through a {LINK_RATE / 1e6:.2f} MB/s "
              f"link; worst stream {min(moved) / fair:.0%} of the fair share; "
              f"RTT p99 {p99 * 1000:.0f} ms over {len(rtts)} samples")
        assert min(moved) >= 0.5 * fair
        assert p99 < 2.0
        for proc in (client, server):
            assert not [ln for ln in proc.stderr_lines
                        if "silent for" in ln or "does not read" in ln]
        assert proxy.connections == 1  # the link was never re-established
        assert sum(moved) / elapsed <= LINK_RATE * 1.1  # the throttle really was the limit
    finally:
        stop.set()
        for _, writer in visitors:
            writer.transport.abort()
        await proxy.close()

