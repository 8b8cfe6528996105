"""End-to-end tests of link faults and hostile peers, with the real programs on 127.0.0.1.

Faults come from a raw WebSocket peer speaking the protocol by hand. The blackholed-link
tests moved to test_cat_faults.py (catalogue R-3).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from tests.e2e.harness import (
    ALPHA_TOKEN,
    LISTENING_RE,
    SERVER_MODULE,
    free_ports,
    server_config,
    start_client,
    start_proc,
    start_server,
    wait_tunnel,
    write_config,
)
from tests.e2e.rawpeer import first_control as _first_control
from tests.e2e.rawpeer import login as _login
from tests.e2e.services import (
    EchoService,
    HalfCloseService,
    close_writer,
    echo_check,
    open_visitor,
    read_to_eof,
)

MIB = 1024 * 1024




async def test_port_bound_by_other_program_refused(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    try:
        _, url = await start_server(tmp_path, server_config(tmp_path, [port]))
        client = await start_client(url, ALPHA_TOKEN, [f"127.0.0.1:9:fixed-{port}"])
        assert await client.wait_exit() == 3
        assert f"port {port}" in client.stderr
        assert "in use by another program" in client.stderr
    finally:
        squatter.close()


async def test_stock_asyncio_loop(tmp_path: Path) -> None:
    """Everything also runs without uvloop (TUNNEL_NO_UVLOOP=1) on both programs."""
    echo = EchoService()
    await echo.start()
    port, auto_port_hint = free_ports(2)
    config = server_config(tmp_path, [port, auto_port_hint])
    path = write_config(tmp_path, config)
    env = {"TUNNEL_NO_UVLOOP": "1"}
    server = await start_proc("tunnel-server", SERVER_MODULE, ["--config", str(path)], env=env)
    url = (await server.wait_for_line(LISTENING_RE))["url"]
    client = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}", echo.target],
                                env=env)
    assert await wait_tunnel(client, echo.target, mode="fixed") == port
    auto = await wait_tunnel(client, echo.target, mode="auto", since=1)
    await asyncio.gather(echo_check(port, 4 * MIB, seed=3), echo_check(auto, 4 * MIB, seed=4))
    assert await client.terminate() == 0
    assert await server.terminate() == 0


async def test_bad_frame_closes_only_that_link(tmp_path: Path) -> None:
    """A malformed frame after login ends that link with a logged reason, not the relay."""
    echo = EchoService()
    await echo.start()
    bad_port, good_port = free_ports(2)
    server, url = await start_server(tmp_path, server_config(tmp_path, [bad_port, good_port]))
    good = await start_client(url, "beta-secret-token-00002", [f"{echo.target}:fixed-{good_port}"])
    assert await wait_tunnel(good, echo.target) == good_port
    ws, _ = await _login(url, ALPHA_TOKEN)
    try:
        welcome = _first_control(await ws.recv())
        assert welcome["type"] == "welcome"
        await ws.send(b"\x09" + b"\x00" * 11)  # version 9
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(2):
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1002
    finally:
        await ws.close()
    await server.wait_for_line(r"protocol error: unsupported protocol version 9", timeout=5,
                               stream="stderr")
    assert server.returncode is None
    await echo_check(good_port, MIB)




async def test_bytes_that_arrive_before_the_local_dial_are_credited_at_once(
        tmp_path: Path) -> None:
    """Regression: credit for data buffered while the client dialled its target was queued
    without waking the writer, so an upload stalled until some unrelated frame (a ping,
    telemetry) went out. With heartbeats and telemetry far apart, a stall is a hang."""
    service = HalfCloseService(reply_size=64, reply_seed=3)  # silent until the upload ends
    await service.start()
    (port,) = free_ports(1)
    config = server_config(tmp_path, [port], heartbeat_interval=30, heartbeat_timeout=90)
    _, url = await start_server(tmp_path, config)
    client = await start_client(url, ALPHA_TOKEN, [f"{service.target}:fixed-{port}"],
                                env={"TUNNEL_TELEMETRY_INTERVAL": "3600"})
    assert await wait_tunnel(client, service.target) == port
    payload = bytes(range(256)) * 4096  # 1 MiB written at once: the first window races the dial
    for _ in range(30):
        async with asyncio.timeout(10):
            reader, writer = await open_visitor(port)
            try:
                writer.write(payload)
                writer.write_eof()
                got_len, _ = await read_to_eof(reader, 64)
            finally:
                await close_writer(writer)
        assert got_len == 64
    assert [r.received_len for r in service.results] == [len(payload)] * 30


