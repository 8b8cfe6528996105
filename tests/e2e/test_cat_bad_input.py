"""Reliability catalogue (../shared/design/reliability.md §2), section (d) bad input, by id."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.harness import (
    ALPHA_TOKEN,
    free_ports,
    server_config,
    start_client,
    start_server,
    wait_tunnel,
)
from tests.e2e.services import (
    EchoService,
    echo_check,
)
from tests.e2e.test_link_faults import _first_control, _login
from tunnel.common.frames import HEADER, MAX_MESSAGE_SIZE, PROTOCOL_VERSION, FrameType
from tunnel.server.control import PRE_AUTH_MAX_MESSAGE

MIB = 1024 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)


async def test_B2_oversized_messages_close_the_link_not_the_relay(tmp_path: Path) -> None:
    """A WebSocket message one byte over the cap (before and after login) closes that link
    with 1009; a mux header claiming 4 GiB is a protocol error; the relay keeps serving."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    server, url = await start_server(tmp_path, server_config(tmp_path, [port]))

    async with connect(url, compression=None, ping_interval=None, proxy=None,
                       max_size=None) as raw:
        await raw.recv()  # challenge
        await raw.send(bytes(PRE_AUTH_MAX_MESSAGE + 1))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(2):
                await raw.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009

    ws, _ = await _login(url, ALPHA_TOKEN)
    try:
        assert _first_control(await ws.recv())["type"] == "welcome"
        await ws.send(bytes(MAX_MESSAGE_SIZE + 1))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(2):
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    finally:
        await ws.close()

    ws, _ = await _login(url, ALPHA_TOKEN)
    try:
        assert _first_control(await ws.recv())["type"] == "welcome"
        claim_4gib = HEADER.pack(PROTOCOL_VERSION, FrameType.DATA, 0, 1, 0xFFFFFFFF)
        await ws.send(claim_4gib)
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(2):
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1002
    finally:
        await ws.close()

    assert server.returncode is None
    client = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
    assert await wait_tunnel(client, echo.target) == port
    await echo_check(port, MIB)
