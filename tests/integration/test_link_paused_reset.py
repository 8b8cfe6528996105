"""A peer's RST on a stream whose socket has reading paused is still noticed.

Found by reliability F-2/F-5: with reading paused and nothing queued to write, nothing polls
the socket, so a visitor that reset its connection kept its stream, window and fd until the
far side ended the stream. The link's watchdog now asks paused sockets for a pending error.
Real sockets on 127.0.0.1; the link around the stream is only the sans-I/O mux (the
websocket is never touched by this path).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any, cast

from tunnel.common.aio.link import Link, StreamSocket
from tunnel.common.proto.frames import Frame, FrameType, decode_frames, encode_frame
from tunnel.common.proto.mux import HEADER_OPEN, Mux, ResetCode, Role


async def _paused_stream(
        reset_peer: bool) -> tuple[Link, StreamSocket, asyncio.Server, socket.socket]:
    accepted: asyncio.Queue[socket.socket] = asyncio.Queue()

    def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.put_nowait(writer.get_extra_info("socket").dup())
        writer.transport.abort()  # keep only the dup: a raw peer the test controls

    server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    mux = Mux(Role.CLIENT)
    mux.receive(encode_frame(Frame(FrameType.OPEN, 1, payload=HEADER_OPEN.pack(1) + b"peer")))
    link = Link(cast(Any, None), mux, name="alpha", logger=logging.getLogger("test"),
                heartbeat_interval=1.0, heartbeat_timeout=3.0, clock=lambda: 0.0)
    stream = StreamSocket()
    stream.attach(link, 1)
    await asyncio.get_running_loop().create_connection(lambda: stream, "127.0.0.1", port)
    peer = await asyncio.wait_for(accepted.get(), 5)
    stream._pause_reading(link)  # as when its window is spent
    if reset_peer:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
    return link, stream, server, peer


async def _reset_arrived(stream: StreamSocket) -> None:
    """Wait until the peer's RST has reached the stream's socket, without reading it: a
    socket with a pending error is readable, so a duplicate of its descriptor (the loop
    watches none while reading is paused) tells when, and SO_ERROR stays for the link."""
    assert stream.transport is not None
    probe = stream.transport.get_extra_info("socket").dup()
    arrived = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(probe.fileno(), arrived.set)
    try:
        async with asyncio.timeout(5):
            await arrived.wait()
    finally:
        loop.remove_reader(probe.fileno())
        probe.close()


def _assert_reset_as_aborted(link: Link, stream: StreamSocket) -> None:
    """The stream is gone from the link and the peer is told ABORTED, nothing else."""
    assert stream.closed and 1 not in link.streams and 1 not in link.mux
    frames = list(decode_frames(link.mux.next_message() or b""))
    assert [(f.type, f.stream_id, f.value) for f in frames] == [
        (FrameType.RESET, 1, ResetCode.ABORTED)]


async def test_reset_while_paused_resets_the_stream() -> None:
    link, stream, server, _ = await _paused_stream(reset_peer=True)
    try:
        await _reset_arrived(stream)
        assert not stream.closed  # nothing polls a paused socket by itself
        stream.check_reset()
        _assert_reset_as_aborted(link, stream)
    finally:
        server.close()


async def test_live_paused_socket_is_left_alone() -> None:
    link, stream, server, peer = await _paused_stream(reset_peer=False)
    try:
        stream.check_reset()  # nothing to wait for: no RST is coming
        assert not stream.closed and 1 in link.streams
        assert link.mux.next_message() is None
    finally:
        peer.close()
        assert stream.transport is not None
        stream.transport.abort()
        server.close()


async def test_remote_eof_after_an_unnoticed_reset_resets_only_the_stream() -> None:
    """Found by R-10 in CI: the peer's FIN came for a stream whose visitor had reset while
    reading was paused; asyncio's ``write_eof`` raised ENOTCONN out of the link's read loop
    and took the whole link (every other stream of that client) down with it."""
    link, stream, server, _ = await _paused_stream(reset_peer=True)
    try:
        await _reset_arrived(stream)
        assert not stream.closed
        stream.remote_eof()  # must not raise
        _assert_reset_as_aborted(link, stream)
    finally:
        server.close()
