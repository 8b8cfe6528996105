"""Our RFC 6455 framing (tunnel/common/aio/wsframing.py) taking over a real `websockets`
connection on 127.0.0.1: both ends switch after the handshake, the size cap reaches a
`websockets` peer as 1009, and a peer that spoke out of turn is refused. The framing's
byte-level behaviour is tested without sockets in tests/unit/test_wsframing.py."""

from __future__ import annotations

import asyncio
import os

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import Side

from tunnel.common.aio.wsframing import WsFraming, take_over
from tunnel.common.errors import RemoteProtocolError


async def test_take_over_on_both_ends_after_a_real_handshake() -> None:
    """Both ends switch after websockets' handshake, then move messages, pings, a close."""
    server_side: asyncio.Future[WsFraming] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        framing = take_over(ws, max_message_size=1 << 20)
        server_side.set_result(framing)
        await framing.send(b"challenge")
        while True:
            try:
                message = await framing.recv()
            except ConnectionClosed:
                break
            assert not isinstance(message, str)
            await framing.send(bytes(message)[::-1])
        done.set()

    async with serve(handler, "127.0.0.1", 0, compression=None, ping_interval=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None, ping_interval=None,
                           proxy=None) as ws:
            assert await ws.recv() == b"challenge"
            client = take_over(ws, max_message_size=1 << 20)
            assert ws.protocol.side is Side.CLIENT and client.client
            for size in (1, 1000, 200_000, 1 << 20):
                payload = os.urandom(size)
                await client.send(payload)
                async with asyncio.timeout(5):
                    reply = await client.recv()
                assert not isinstance(reply, str) and bytes(reply) == payload[::-1]
            async with asyncio.timeout(5):
                await client.close(1000, "done")
                await done.wait()
        assert (await server_side).close_rcvd is not None


async def test_websockets_client_sees_1009_from_our_server() -> None:
    """The pre-auth cap as the B-2 test sees it: websockets gets 1009 and the TCP ends."""
    async def handler(ws: ServerConnection) -> None:
        framing = take_over(ws, max_message_size=4096)
        await framing.send(b"challenge")
        with pytest.raises(ConnectionClosed):
            while True:
                await framing.recv()

    async with serve(handler, "127.0.0.1", 0, compression=None, ping_interval=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None, ping_interval=None,
                           proxy=None, max_size=None) as ws:
            await ws.recv()
            await ws.send(bytes(4097))
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(3):
                    await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_take_over_refuses_when_the_peer_spoke_out_of_turn() -> None:
    """A server that sends two messages where one was due: the client will not switch."""
    async def handler(ws: ServerConnection) -> None:
        await ws.send(b"challenge")
        await ws.send(b"out of turn")
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None, ping_interval=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None, ping_interval=None,
                           proxy=None) as ws:
            assert await ws.recv() == b"challenge"
            async with asyncio.timeout(3):
                while not len(ws.recv_messages.frames):
                    await asyncio.sleep(0.01)  # no event exists for "frame queued"
            with pytest.raises(RemoteProtocolError):
                take_over(ws, max_message_size=None)
