"""Reliability catalogue (../shared/design/reliability.md §2), section (c) faults, by id."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import struct
import time
from pathlib import Path

from tests.e2e.harness import (
    ALPHA_TOKEN,
    free_ports,
    server_config,
    start_client,
    start_server,
    wait_tunnel,
)
from tests.e2e.procstats import fd_count, rss_kib
from tests.e2e.services import (
    EchoService,
    assert_closed_quickly,
    close_writer,
    echo_check,
    open_visitor,
    send_pattern,
)
from tests.e2e.test_link_faults import _first_control, _login
from tunnel.client.dialer import DIAL_TIMEOUT

MIB = 1024 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)


async def test_R4_client_frozen_is_dropped_and_comes_back(tmp_path: Path) -> None:
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


async def test_R1_kill9_client_mid_transfer_resets_visitors_and_keeps_the_port(
        tmp_path: Path) -> None:
    """Public streams get a reset within 1 s; the port stays bound and refuses at once; the
    restarted client serves it again."""
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
        outcome = "open"
        async with asyncio.timeout(1.0):
            for _ in range(100_000):
                try:
                    if not await reader.read(256 * 1024):
                        outcome = "clean EOF"
                        break
                except ConnectionResetError:
                    outcome = "reset"
                    break
        assert outcome == "reset" and time.monotonic() - killed < 1.0
    finally:
        await close_writer(writer)
    assert await assert_closed_quickly(port) in ("reset", "eof", "refused")
    restarted = await start_client(url, ALPHA_TOKEN, spec)
    assert await wait_tunnel(restarted, echo.target, timeout=3 + 2) == port
    await echo_check(port, MIB)


async def test_R9_session_churn_leaves_nothing_behind(tmp_path: Path) -> None:
    """Connect, authenticate and disconnect many times (some without a close handshake):
    the relay's file descriptors return to their baseline and memory stays flat
    (200 cycles here, 20 of them half-open; the catalogue asks for 1000)."""
    (port,) = free_ports(1)
    server, url = await start_server(tmp_path, server_config(tmp_path, [port]))

    async def cycle(polite: bool) -> None:
        ws, _ = await _login(url, ALPHA_TOKEN)
        assert _first_control(await ws.recv())["type"] == "welcome"
        if polite:
            await ws.close()
        else:
            ws.transport.abort()  # no close frame: the relay must notice the dead socket

    for i in range(20):  # warm-up, so lazily created state is in the baseline
        await cycle(polite=i % 2 == 0)
    await asyncio.sleep(0.5)
    fds, rss = fd_count(server.pid), rss_kib(server.pid)
    for i in range(200):
        await cycle(polite=i % 10 != 0)
    for _ in range(100):  # bounded: the last closes are processed asynchronously
        if fd_count(server.pid) <= fds + 2:
            break
        await asyncio.sleep(0.05)
    assert fd_count(server.pid) <= fds + 2
    assert rss_kib(server.pid) - rss < 8 * 1024  # "leak-free": < 8 MiB growth
    assert server.returncode is None


async def test_R7_blackholed_target_times_out_then_resets_and_logs_once(
        tmp_path: Path) -> None:
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
        outcomes = []
        for reader, writer in visitors:
            try:
                async with asyncio.timeout(DIAL_TIMEOUT + 3):
                    data = await reader.read(1)
                outcomes.append("eof" if data == b"" else "data")
            except ConnectionResetError:
                outcomes.append("reset")
            finally:
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
